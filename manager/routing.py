"""Sans-IO routing state of the manager: which task goes where, and what to send next.

    events (.events: a client submitted, an endpoint registered, results arrived, a heartbeat,
    a tick, code loaded off the loop) --> Router.handle(*events) --> instructions (persist rows,
    notify an internal task's owner) now, and the sends of the whole wake-up at ``Flush``

The broker loop turns frames into events and carries out the instructions; the Router reads no
clock (the time comes with the events), touches no socket and writes nothing itself. Sends are
held until the loop's ``Flush`` so results that arrive together leave together (one message per
client). Two lookups are injected and may read the database on a cache miss: ``resolve`` (a
servable name) and ``principal``/``servable_owner`` (for endpoint policies); everything slow
else (Query/Fetch reads, code and packages) the broker does off the loop. Called method by method
with a store (``emit=False``, the unit tests), writes go straight to ``store``.

A task lives in ``tasks`` from receipt until its terminal state is committed. Tasks for an
endpoint that is offline wait in its ``pending`` queue (state ``queued``); tasks sent to an
endpoint stay in its ``inflight`` map until their result arrives, and are re-sent when the
endpoint registers again (the endpoint drops ids it already holds).

Here: the Router's state, its clients' side (submit, cancel) and a task's way to its terminal
state. Mixed in: its endpoints' side (Hello, heartbeats, results) from ``.endpoints``, held tasks
from ``.fair_share``, its reads of the store (code, restart, Query's rows) from ``.router_store``.
It composes a ``.code_book.CodeBook`` (code blobs); a task's row columns are in ``.task_rows``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dlhub.protocol import errors
from dlhub.protocol import messages as m

from . import events as ev
from . import fair_share
from .code_book import CodeBook, note_sent
from .code_book import code_matches as code_matches  # re-exported: the broker imports it here
from .endpoints import EndpointsMixin, EndpointState
from .result_cache import ResultCache, cache_key
from .router_store import FINISHED_MEMORY, StoreMixin
from .task_rows import _cancelled_error, _json, _pack_error
from .task_rows import may_see as may_see  # re-exported: the broker imports it here

MAX_OPEN_TASKS_PER_USER = 1_000_000  # default quota: tasks one user may have queued or running
MAX_TASKS_PER_MESSAGE = 2048


@dataclass
class TaskEntry:
    record: m.TaskRecord  # the wire task record (holds the payload until the task is terminal)
    endpoint: str
    client: bytes  # routing identity of the submitting client
    state: str
    cache_key: str | None = None  # deterministic servable call: its result-cache key
    owner: str = ""  # the submitting user: only they (and admins) may see, fetch or cancel it
    watchers: list[bytes] = field(default_factory=list)  # admins' clients that fetched it too
    counted: bool = False  # in its owner's open-task count (tasks recovered at start are not)


class Router(EndpointsMixin, fair_share.FairShareMixin, StoreMixin):
    _task_entry = TaskEntry  # for .router_store's recover (which does not import this module)

    def __init__(
        self,
        store: Any,
        clock: Callable[[], float] = time.time,
        endpoint_timeout_s: float = 30.0,
        known_endpoints: list[str] | None = None,
        resolve: Callable[[str, str], str] | None = None,
        packages: Callable[[str], bytes | None] | None = None,
        result_cache: ResultCache | None = None,
        deterministic: Callable[[str], bool] | None = None,
        principal: Callable[[str], tuple[bool, frozenset[str]]] | None = None,
        servable_owner: Callable[[str], str | None] | None = None,
        max_open_tasks_per_user: int = MAX_OPEN_TASKS_PER_USER,
        max_inflight_per_user: int = fair_share.MAX_INFLIGHT_PER_USER,
        emit: bool = False,
        event_log: str | None = None,
    ):
        self.store = store
        # emit: writes and callbacks come out of handle() as instructions (the broker); else
        # they go straight to ``store`` and the callbacks (method-by-method callers, tests)
        self.emit = emit
        self.instructions: list[ev.Instruction] = []
        self._now: float | None = None  # the last event's time (None: read ``clock``)
        self.event_log = ev.EventLog(event_log) if event_log else None
        # endpoint policies: user -> (is an admin, its groups), and a package digest -> the
        # servable's owner; both go into each task's origin for the endpoint to check
        self.principal = principal
        self.servable_owner = servable_owner
        # servables: ("owner/name[:version]", user) -> "servable:<digest>" (raises DLHubError); the
        # code book reads servable packages (digest -> package blob) for endpoints that ask for them
        self.resolve = resolve
        self.callbacks: dict[bytes, Callable[[list], None]] = {}  # internal tasks (REST, verify)
        self._endpoint_uuids: dict[str, str] = {}  # Globus Compute UUID -> endpoint name
        # deterministic servables: answered from the cache, identical calls in flight coalesced
        self.result_cache = result_cache
        self.deterministic = deterministic
        self.leaders: dict[str, bytes] = {}  # cache key -> the task that runs
        self.followers: dict[bytes, list[bytes]] = {}  # leader -> tasks waiting for its result
        self.clock = clock
        self.endpoint_timeout_s = endpoint_timeout_s
        self.tasks: dict[bytes, TaskEntry] = {}
        self.endpoints: dict[str, EndpointState] = {
            name: EndpointState(name) for name in known_endpoints or ()
        }
        self.endpoint_by_identity: dict[bytes, str] = {}
        self.finished: OrderedDict[bytes, str] = OrderedDict()
        self.code_book = CodeBook(store, packages)  # code blobs and packages endpoints may fetch
        self.outbox: list[tuple[str, bytes, m.Message]] = []
        self._results_out: dict[bytes, list] = {}  # client identity -> results to send
        self.counters = {
            "received": 0,
            "finished": 0,
            "duplicates": 0,
            "refused": 0,
            "over_quota": 0,
            "resent": 0,  # tasks sent again to an endpoint at its Hello (it did not hold them)
        }
        # quota: a user (admins exempt) may have this many tasks open (queued or running) at once
        self.max_open_tasks_per_user = max_open_tasks_per_user
        self.open_by_user: dict[str, int] = {}
        # fair share of each endpoint (.fair_share): a user's tasks in flight there, at most
        # max_inflight_per_user (or the window while users compete); the rest wait here
        self.max_inflight_per_user = max_inflight_per_user
        self.share = fair_share.ShareWindow()
        self._release_due: set[str] = set()  # endpoints where held tasks may have room now
        self._holding: set[str] = set()  # endpoints with held tasks (may be stale: then none)
        self._paced = False  # users compete and tasks are held: released at the window's rate

    # ---- events in, instructions out ---------------------------------------------------------

    def handle(self, *events: ev.Event) -> list[ev.Instruction]:
        """Apply ``events`` in order; return what to do now (writes, callbacks). Sends wait in
        the outbox until a :class:`~.events.Flush` event returns them all at once."""
        for event in events:
            if self.event_log is not None:
                self.event_log.write(event)
            now = getattr(event, "now", None)
            if now is not None:
                self._now = now
            handler = _HANDLERS.get(type(event))
            if handler is None:
                raise TypeError(f"the Router has no handler for {type(event).__name__}")
            handler(self, event)
        out, self.instructions = self.instructions, []
        return out

    def _time(self) -> float:
        return self._now if self._now is not None else self.clock()

    def _write(self, op: ev.Persist) -> None:
        if self.emit:
            self.instructions.append(op)
        else:
            op.apply(self.store)

    def _notify(self, callback: Callable[[list], None], res: list) -> None:
        if self.emit:
            self.instructions.append(ev.Notify(callback, res))
        else:
            callback(res)

    # ---- clients -------------------------------------------------------------------------

    def submit(
        self,
        client: bytes,
        owner: str,
        session: str,
        msg: m.Submit,
        callback: Callable[[list], None] | None = None,
    ) -> None:
        """Accept tasks from a client, or (``callback`` set, ``client`` empty) from the manager
        itself: REST calls and publish verification, whose results go to the callback."""
        now = self._time()
        ep = self.endpoints.get(msg.endpoint)
        if ep is None:
            ep = self.endpoint_by_uuid(msg.endpoint)
            if ep is not None:  # named by its Globus Compute UUID: from here on, by its name
                msg = m.Submit(ep.name, msg.tasks)
        if ep is None:
            err = errors.infra_error(
                "unknown-endpoint",
                f"endpoint {msg.endpoint!r} is not registered with this manager "
                f"(known: {', '.join(sorted(self.endpoints)) or 'none'})",
            )
            for rec in msg.tasks:
                self._reply_now(client, callback, m.result_record(rec[m.T_ID], "failed", error=err))
            return
        rows, acks, fresh, held = [], [], [], []
        ep.recent[owner] = now
        # how many may go now: none while this user has tasks held here (they go first, in order)
        if not ep.connected or ep.identity is None or owner in ep.held:
            free = 0
        else:
            free = fair_share.grant(ep, owner, len(msg.tasks), now, self.max_inflight_per_user, self.share)
        resolved: dict[str, str | list] = {}
        origins: dict[str | None, dict] = {}  # servable owner -> this submitter's origin
        tasks = msg.tasks
        for i, rec in enumerate(tasks):
            if type(rec) is not m.TaskRecord:  # a list from a caller in this process
                rec = tasks[i] = m.as_task_record(rec)
            task_id = rec.id
            function = rec.function
            if (
                function.startswith(m.REF_PREFIX)
                and task_id not in self.tasks
                and task_id not in self.finished
            ):
                target = resolved.get(function)
                if target is None:
                    target = resolved[function] = self._resolve(function[len(m.REF_PREFIX) :], owner)
                if isinstance(target, list):  # an error record: nothing routable by that name
                    self._reply_now(client, callback, m.result_record(task_id, "failed", error=target))
                    continue
                rec = tasks[i] = rec._replace(function=target)
            elif m.package_key(function) is not None and callback is None:
                err = errors.infra_error(
                    "servable-not-found", "clients name servables as owner/name[:version], not by package"
                )
                self._reply_now(client, callback, m.result_record(task_id, "failed", error=err))
                continue
            if callback is not None:
                self.callbacks[task_id] = callback
            if task_id in self.tasks or task_id in self.finished:
                self.counters["duplicates"] += 1
                entry = self.tasks.get(task_id)
                if entry is not None and entry.owner != owner:  # another user's id: not theirs to take
                    err = errors.infra_error("invalid-request", f"task id {task_id.hex()} is already in use")
                    self._reply_now(client, callback, m.result_record(task_id, "failed", error=err))
                    continue
                if entry is not None:
                    entry.client = client  # a reconnected client gets the result
                # already committed (or being committed): acknowledge again after this batch, even
                # when finished (a resend: the client may lack the result; "client-again" is never
                # skipped, as a first submission's ack is once its result has gone)
                acks.append(("client-again", client, task_id))
                continue
            origin = self._origin(owner, rec.function, function, origins)
            rec = tasks[i] = m.with_origin(rec, origin)  # whatever the client wrote there is replaced
            # the endpoint's policy, mirrored: a refused task is never sent (nor cached, coalesced)
            refused = ep.policy.refusal(origin, rec[m.T_FUNCTION]) if ep.policy is not None else None
            if refused is not None:
                denied = ep.policy.error(refused)
            elif self.open_by_user.get(owner, 0) >= self.max_open_tasks_per_user:
                denied = self._over_quota(owner)  # None for an admin
            else:
                denied = None
            key = self._cache_key(rec) if denied is None else None
            cached = self.result_cache.get(key) if key is not None else None
            leader = self.leaders.get(key) if key is not None and cached is None else None
            if denied is not None:
                state = "failed"
            elif cached is not None:
                state = "succeeded"
            elif leader is not None:
                state = "queued"  # waits for the identical call already running
            elif ep.connected and free > 0:
                state = "dispatched"
                free -= 1
            else:
                state = "queued"  # the endpoint is offline, or this user has its share in flight there
            options = m.task_options(rec)
            row = {
                "task_id": task_id,
                "owner": owner,
                "client_session": session,
                "endpoint": msg.endpoint,
                "function": rec[m.T_FUNCTION],
                "state": state,
                "timeout_s": rec[m.T_TIMEOUT],
                "result_serializer": rec[m.T_SERIALIZER],
                "resources": _json(rec[m.T_RESOURCES]) if rec[m.T_RESOURCES] else None,
                "options": _json(options) if options else None,
                "t_received": now,
                "t_dispatched": now if state == "dispatched" else None,
                "payload": rec[m.T_PAYLOAD],
            }
            rows.append(row)
            if denied is not None:  # stored as failed (Fetch and Query find why); the result is the ack
                self.counters["refused" if refused is not None else "over_quota"] += 1
                row.update(payload=None, error=_pack_error(denied), t_finished=now)
                self.callbacks.pop(task_id, None)
                self._remember_finished(task_id, "failed")
                self._reply_now(client, callback, m.result_record(task_id, "failed", error=denied))
                continue
            if cached is not None:  # answered here, no endpoint involved; the result is the ack
                row.update(payload=None, result=cached, t_started=now, t_finished=now)
                self.callbacks.pop(task_id, None)
                self._remember_finished(task_id, "succeeded")
                self._reply_now(
                    client, callback, m.result_record(task_id, "succeeded", cached, None, [now, now])
                )
                continue
            acks.append(("client", client, task_id))
            self.tasks[task_id] = TaskEntry(rec, msg.endpoint, client, state, key, owner, counted=True)
            self.open_by_user[owner] = self.open_by_user.get(owner, 0) + 1
            if leader is not None:
                self.followers.setdefault(leader, []).append(task_id)
                self.result_cache.counters["coalesced"] += 1
                continue
            if key is not None:
                self.leaders[key] = task_id
            if state == "queued" and ep.connected and ep.identity is not None:
                held.append(task_id)
            else:
                fresh.append(rec)
        self.counters["received"] += len(rows)
        self._write(ev.PersistReceived(rows, acks))
        if held:
            fair_share.hold(ep, owner, held)
            self._holding.add(ep.name)
        if not fresh:
            return
        if ep.connected and ep.identity is not None:
            for rec in fresh:
                ep.inflight[rec[m.T_ID]] = None
            ep.inflight_by_user[owner] = ep.inflight_by_user.get(owner, 0) + len(fresh)
            self._send_tasks(ep, fresh)
        else:
            for rec in fresh:
                ep.pending[rec[m.T_ID]] = None

    def _origin(self, user: str, function: str, sent: str, cache: dict[str | None, dict]) -> dict:
        """A task's origin for endpoint policies: the submitter, whether an admin, its groups,
        and the owner of the servable it runs (from the name it was called by, else the record)."""
        key = m.package_key(function)
        servable_owner = None
        if key is not None:
            if sent.startswith(m.REF_PREFIX):
                servable_owner = sent[len(m.REF_PREFIX) :].split("/", 1)[0]
            elif self.servable_owner is not None:
                servable_owner = self.servable_owner(key)
        origin = cache.get(servable_owner)
        if origin is None:
            admin, groups = self.principal(user) if self.principal is not None else (False, frozenset())
            origin = {"user": user, "admin": bool(admin)}
            if groups:
                origin["groups"] = sorted(groups)
            if servable_owner is not None:
                origin["owner"] = servable_owner
            cache[servable_owner] = origin
        return origin

    def _over_quota(self, user: str) -> list | None:
        """The error for a task over ``user``'s open-task quota (None: an admin, exempt: admins
        run the hub, and `dlhub up`'s single user is one)."""
        if self.principal is not None and self.principal(user)[0]:
            return None
        return errors.infra_error(
            "quota-exceeded",
            f"{user} already has {self.open_by_user.get(user, 0):,} tasks open (queued or running), "
            f"the most one user may have at once (max_open_tasks_per_user = "
            f"{self.max_open_tasks_per_user:,}); wait for some to finish; {errors.RAISE_QUOTA}",
        )

    def _cache_key(self, rec: list) -> str | None:
        """The result-cache key of a call of a deterministic servable that allows caching."""
        if self.result_cache is None or self.deterministic is None:
            return None
        function = rec[m.T_FUNCTION]
        if not function.startswith(m.RUN_PREFIX):
            return None
        options = m.task_options(rec)
        if options.get("cache", True) is False or not options.get("key") or not self.deterministic(function):
            return None
        return cache_key(function, options["key"], rec[m.T_SERIALIZER])

    def _remember_finished(self, task_id: bytes, state: str) -> None:
        self.finished[task_id] = state
        if len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _resolve(self, ref: str, user: str) -> str | list:
        """The package a servable name routes to now for ``user`` (the submitter: a servable it
        may not see is not found, in the same words as one that does not exist), or an error
        record saying why none."""
        if self.resolve is None:
            return errors.infra_error("servable-not-found", "this manager has no servable repository")
        try:
            return self.resolve(ref, user)
        except errors.DLHubError as exc:
            return errors.infra_error(exc.code, str(exc))

    def _reply_now(self, client: bytes, callback: Callable[[list], None] | None, res: list) -> None:
        if callback is not None:
            self._notify(callback, res)
        else:
            self._result_to_client(client, res)

    def cancel(self, client: bytes, task_ids: list[bytes], user: str | None = None) -> None:
        """Cancel what has not reached a worker; ask the endpoint about the rest. ``user``: the
        caller, who may cancel only its own tasks (None: an admin); another user's task is
        refused exactly like an unknown id."""
        refused, forward = [], {}
        for task_id in task_ids:
            entry = self.tasks.get(task_id)
            if entry is None or entry.state in m.TERMINAL_STATES or not may_see(user, entry.owner):
                refused.append(task_id)
                continue
            ep = self.endpoints[entry.endpoint]
            waiting_for = self._leader_of(task_id, entry)
            if waiting_for is not None:  # coalesced: it waits here, for another task's result
                self.followers[waiting_for].remove(task_id)
                self._finish(m.result_record(task_id, "cancelled", error=_cancelled_error()), ep=None)
            elif task_id in ep.pending or fair_share.unhold(ep, entry.owner, task_id):
                ep.pending.pop(task_id, None)
                self._finish(m.result_record(task_id, "cancelled", error=_cancelled_error()), ep=None)
            elif ep.connected and ep.identity is not None:
                forward.setdefault(ep.identity, []).append(task_id)
            else:
                refused.append(task_id)
        for identity, ids in forward.items():
            self.outbox.append(("endpoint", identity, m.Cancel(ids)))
        if refused:
            self.outbox.append(("client", client, m.CancelRefused(refused, "not cancellable")))

    def _leader_of(self, task_id: bytes, entry: TaskEntry) -> bytes | None:
        leader = self.leaders.get(entry.cache_key) if entry.cache_key else None
        if leader is not None and leader != task_id and task_id in self.followers.get(leader, ()):
            return leader
        return None

    # ---- results -----------------------------------------------------------------------------

    def _finish(self, res: list, ep: EndpointState | None, shareable: bool = True) -> None:
        task_id = res[m.R_ID]
        entry = self.tasks.get(task_id)
        acks = [("endpoint", ep.identity, task_id)] if ep is not None and ep.identity else []
        if entry is None and task_id not in self.finished:
            # A task this manager does not know (yet): after a kill, the endpoint resends results
            # of tasks that were never committed, often before their client resent them. Left
            # unacknowledged, the endpoint keeps the result and answers the resent task with it;
            # acknowledged here, it would drop it and run the resent task a second time.
            self.counters["held_results"] = self.counters.get("held_results", 0) + 1
            return
        if entry is None or entry.state in m.TERMINAL_STATES:
            self._write(ev.PersistUpdates([], acks))  # a duplicate result: acknowledge it again
            return
        entry.state = res[m.R_STATE]
        endpoint = self.endpoints.get(entry.endpoint)
        if endpoint is not None and task_id in endpoint.inflight:
            del endpoint.inflight[task_id]
            by_user = endpoint.inflight_by_user
            left = by_user.get(entry.owner, 0) - 1
            if left > 0:
                by_user[entry.owner] = left
            else:
                by_user.pop(entry.owner, None)
            if endpoint.held:  # a place is free: held tasks may go at Flush
                self._release_due.add(endpoint.name)
        elif endpoint is not None and endpoint.held:  # held here, answered anyway (a resent result)
            fair_share.unhold(endpoint, entry.owner, task_id)
        timing = res[m.R_TIMING] or [None, None]
        output = res[m.R_OUTPUT] or [None, None]
        change = {
            "state": res[m.R_STATE],
            "t_finished": self._time(),
            "t_started": timing[0],
            "result": res[m.R_PAYLOAD],
            "error": _pack_error(res[m.R_ERROR]),
            "stdout": output[0],
            "stderr": output[1],
            "payload": None,
        }
        self._write(ev.PersistUpdates([(task_id, change)], acks))
        self.counters["finished"] += 1
        del self.tasks[task_id]
        if entry.counted:
            left = self.open_by_user[entry.owner] - 1
            if left:
                self.open_by_user[entry.owner] = left
            else:
                del self.open_by_user[entry.owner]
        self._remember_finished(task_id, res[m.R_STATE])
        if entry.cache_key is not None and self.leaders.get(entry.cache_key) == task_id:
            self._leader_finished(entry, res, shareable)
        callback = self.callbacks.pop(task_id, None)
        if callback is not None:
            self._notify(callback, res)
        elif entry.client:
            self._result_to_client(entry.client, res)
        for watcher in entry.watchers:
            if watcher != entry.client:
                self._result_to_client(watcher, res)

    def _leader_finished(self, entry: TaskEntry, res: list, shareable: bool = True) -> None:
        """Cache a success and give it to every coalesced call; after a failure (cancelled, lost,
        an exception), or a success that names an output stored for its caller (not
        ``shareable``), each of them runs itself."""
        del self.leaders[entry.cache_key]
        followers = self.followers.pop(res[m.R_ID], [])
        if shareable and res[m.R_STATE] == "succeeded" and res[m.R_PAYLOAD] is not None:
            self.result_cache.put(entry.cache_key, res[m.R_PAYLOAD])
            for task_id in followers:
                self._finish(
                    m.result_record(
                        task_id, "succeeded", res[m.R_PAYLOAD], None, res[m.R_TIMING], res[m.R_OUTPUT]
                    ),
                    ep=None,
                )
            return
        by_endpoint: dict[str, list[TaskEntry]] = {}
        for task_id in followers:  # each to the endpoint it was submitted for
            follower = self.tasks.get(task_id)
            if follower is not None:
                by_endpoint.setdefault(follower.endpoint, []).append(follower)
        now = self._time()
        for name, runnable in by_endpoint.items():
            ep = self.endpoints.get(name)
            if ep is None:
                continue
            for e in runnable:
                e.state = "dispatched" if ep.connected else "queued"
            if ep.connected and ep.identity is not None:
                self._write(
                    ev.PersistUpdates(
                        [(e.record[m.T_ID], {"state": "dispatched", "t_dispatched": now}) for e in runnable]
                    )
                )
                for e in runnable:
                    ep.inflight[e.record[m.T_ID]] = None
                    ep.inflight_by_user[e.owner] = ep.inflight_by_user.get(e.owner, 0) + 1
                self._send_tasks(ep, [e.record for e in runnable])
            else:
                for e in runnable:
                    ep.pending[e.record[m.T_ID]] = None

    def _result_to_client(self, client: bytes, res: list) -> None:
        self._results_out.setdefault(client, []).append(res)

    def sends_waiting(self) -> bool:
        """Whether a Flush would send anything now (most loop turns: no)."""
        return bool(self.outbox or self._results_out or self._release_due or self._paced)

    def drain(self) -> list[tuple[str, bytes, m.Message]]:
        """Everything to send now (held tasks that have room first); results are coalesced into
        one message per client."""
        if self._release_due or self._paced:
            self._release_held()
        for client, results in self._results_out.items():
            self.outbox.append(("client", client, m.Results(results)))
        self._results_out = {}
        out, self.outbox = self.outbox, []
        return out

    def _send_tasks(self, ep: EndpointState, records: list[list]) -> None:
        note_sent(ep.code_sent, records)
        for i in range(0, len(records), MAX_TASKS_PER_MESSAGE):
            self.outbox.append(("endpoint", ep.identity, m.Tasks(records[i : i + MAX_TASKS_PER_MESSAGE], {})))

    def status(self) -> dict[str, Any]:
        now = self._time()
        return {
            "endpoints": {
                ep.name: {
                    "connected": ep.connected,
                    "last_seen_s_ago": round(now - ep.last_seen, 3) if ep.last_seen else None,
                    "pending": len(ep.pending),
                    "inflight": len(ep.inflight),
                    "held": fair_share.held_count(ep),  # waiting here for their user's fair share
                    "versions": ep.versions,
                    "info": ep.info,
                }
                for ep in self.endpoints.values()
            },
            "tasks_open": len(self.tasks),
            "fair_share_window": self.share.size,
            "result_cache": self.result_cache.stats() if self.result_cache is not None else None,
            **self.counters,
        }


def _flush(router: Router, _event: ev.Flush) -> None:
    if router.sends_waiting():  # most loop turns have nothing to send
        router.instructions.extend([ev.Send(*out) for out in router.drain()])


# what each event does: one dict lookup per event (a ``match`` over a dozen classes cost ~2 us
# an event on the serial round trip's path, which hands the Router four or five events)
_HANDLERS: dict[type, Callable[[Router, Any], None]] = {
    ev.ClientSubmitted: lambda r, e: r.submit(e.identity, e.user, e.session, e.msg, e.callback),
    ev.ClientCancelled: lambda r, e: r.cancel(e.identity, e.task_ids, e.user),
    ev.CodePut: lambda r, e: r.put_code(e.digest, e.blob),
    ev.CodeLoaded: lambda r, e: r.remember_code(e.blobs),
    ev.EndpointRegistered: lambda r, e: r.endpoint_hello(e.identity, e.hello, e.owner),
    ev.EndpointResultsArrived: lambda r, e: r.endpoint_results(e.identity, e.results, e.uncacheable),
    ev.EndpointStatesArrived: lambda r, e: r.endpoint_states(e.identity, e.updates),
    ev.EndpointHeartbeat: lambda r, e: r.endpoint_heartbeat(e.identity, e.info),
    ev.EndpointCancelRefused: lambda r, e: r.endpoint_cancel_refused(e.identity, e.msg),
    ev.EndpointLeft: lambda r, e: r.endpoint_gone(e.identity),
    ev.Tick: lambda r, e: r.tick(),
    ev.LoopLoad: lambda r, e: r.loop_load(e.busy),
    ev.Flush: _flush,
}
