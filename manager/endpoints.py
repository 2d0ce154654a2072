"""The endpoint side of the Router: what endpoints say, and what the manager knows of each.

    Hello --> endpoint_hello: register it, re-send what it does not hold, send what waited
              (checked against its policy first)
    Heartbeat --> endpoint_heartbeat            Goodbye --> endpoint_gone
    Results, States, CancelRefused --> endpoint_results, endpoint_states, endpoint_cancel_refused
              (counted only from the endpoint the task was dispatched to)
    Tick --> tick: an endpoint whose heartbeats stopped is disconnected (its tasks wait)

Apart from routing.py because it is the half of the Router that faces endpoints (registration,
liveness, what they report); the client half and a task's life from receipt to its terminal state
stay there. :class:`EndpointsMixin` is mixed into the ``Router``, not composed: these handlers read
and change most of its state (``tasks``, ``endpoints``, ``counters``, ``outbox``) and call its
core (``_finish``, ``_send_tasks``, ``_write``, ``_time``) on every message, so that state stays
the Router's own. Same sans-I/O rules as the Router: no clock read, no socket, no database.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dlhub.protocol import errors
from dlhub.protocol import messages as m
from dlhub.protocol.gc_serialize import endpoint_uuid
from dlhub.protocol.policy import Policy

from . import events as ev
from . import fair_share

if TYPE_CHECKING:
    from .routing import TaskEntry

log = logging.getLogger("dlhub.manager.routing")  # the Router's: its log lines read as before


@dataclass
class EndpointState:
    name: str
    identity: bytes | None = None
    session: str = ""
    connected: bool = False
    last_seen: float = 0.0
    versions: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    owner: str | None = None  # the user whose token registered it
    policy: Policy | None = None  # from its Hello (None: an endpoint from before policies)
    pending: OrderedDict = field(default_factory=OrderedDict)  # task_id -> None (not yet sent)
    inflight: dict = field(default_factory=dict)  # task_id -> None (sent, no result yet)
    # fair share (.fair_share): each user's tasks in ``inflight``, the tasks each user has waiting
    # here for room (user -> task ids, oldest first; state queued), and who submitted when
    inflight_by_user: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)
    recent: dict = field(default_factory=dict)
    # digests of the code its tasks named (most recent last): all the code it may fetch
    code_sent: OrderedDict = field(default_factory=OrderedDict)


class EndpointsMixin:
    """The Router's handlers of endpoint messages (see the module docstring). Works on the
    Router's state; these are the attributes it uses:"""

    endpoints: dict[str, EndpointState]
    endpoint_by_identity: dict[bytes, str]
    _endpoint_uuids: dict[str, str]
    tasks: dict[bytes, TaskEntry]
    counters: dict[str, int]
    outbox: list[tuple[str, bytes, m.Message]]
    endpoint_timeout_s: float

    def endpoint_by_uuid(self, key: str) -> EndpointState | None:
        """The endpoint whose Globus Compute UUID (``uuid5`` of its name, as ``dlhub-endpoint
        list`` and ``dlhub status`` show it) is ``key``: usable wherever a name is."""
        if len(key) != 36:
            return None
        if len(self._endpoint_uuids) != len(self.endpoints):  # endpoints are only ever added
            self._endpoint_uuids = {endpoint_uuid(name): name for name in self.endpoints}
        name = self._endpoint_uuids.get(key)
        return self.endpoints.get(name) if name is not None else None

    def _endpoint(self, identity: bytes) -> EndpointState | None:
        name = self.endpoint_by_identity.get(identity)
        return self.endpoints.get(name) if name is not None else None

    def endpoint_hello(self, identity: bytes, hello: m.Hello, owner: str | None = None) -> None:
        """Register an endpoint; ``owner`` is the user whose token it presented (its policy's
        default ``allowed_users``)."""
        now = self._time()
        ep = self.endpoints.get(hello.name)
        if ep is None:
            ep = self.endpoints[hello.name] = EndpointState(hello.name)
        if ep.identity is not None and ep.identity != identity:
            self.endpoint_by_identity.pop(ep.identity, None)
        ep.identity, ep.session, ep.connected, ep.last_seen = identity, hello.session, True, now
        bad_versions = m.check_plain_data(hello.versions, "versions")
        if bad_versions:
            log.warning("endpoint %r sent malformed Hello versions, ignored: %s", hello.name, bad_versions)
        ep.versions = {} if bad_versions else dict(hello.versions)
        held, info = held_ids(hello.info)
        ep.info = self._valid_info(hello.name, info) or {}
        ep.owner, ep.policy = owner, self._policy(hello.name, info, owner)
        self.endpoint_by_identity[identity] = ep.name
        welcome = {"name": ep.name, "owner": owner} if owner else {"name": ep.name}
        self.outbox.append(("endpoint", identity, m.Welcome(ep.session, welcome)))
        # in flight: sent before; only what the endpoint does not hold goes again (lost with a
        # dropped connection, or a restarted endpoint's), not a burst of everything
        resend = [self.tasks[t].record for t in ep.inflight if t in self.tasks and t not in held]
        self.counters["resent"] += len(resend)
        waiting = [self.tasks[t].record for t in ep.pending if t in self.tasks]
        if waiting and ep.policy is not None:  # queued while its policy was unknown (or changed)
            waiting = self._admitted(ep, waiting)
        ep.pending.clear()
        if resend:
            self._send_tasks(ep, resend)
        # what waited goes as each user's fair share allows (the rest stays held here)
        for rec in waiting:
            fair_share.hold(ep, self.tasks[rec[m.T_ID]].owner, [rec[m.T_ID]])
        self._release(ep)
        if ep.held:
            self._holding.add(ep.name)

    @staticmethod
    def _policy(name: str, info: Any, owner: str | None) -> Policy | None:
        """The policy an endpoint sent in its Hello (None: it sent none, or a malformed one,
        logged: the endpoint still enforces its own)."""
        data = info.get("policy") if isinstance(info, dict) else None
        if data is None:
            return None
        try:
            return Policy.from_wire(name, data, owner)
        except ValueError as exc:
            log.warning("endpoint %r sent a malformed policy, not mirrored: %s", name, exc)
            return None

    def _admitted(self, ep: EndpointState, records: list[list]) -> list[list]:
        """The records ``ep``'s policy admits; the others fail now with the refusal."""
        out = []
        for rec in records:
            refused = ep.policy.refusal(m.task_origin(rec), rec[m.T_FUNCTION])
            if refused is None:
                out.append(rec)
                continue
            self.counters["refused"] += 1
            ep.pending.pop(rec[m.T_ID], None)
            self._finish(m.result_record(rec[m.T_ID], "failed", error=ep.policy.error(refused)), ep=None)
        return out

    def endpoint_heartbeat(self, identity: bytes, info: dict) -> bool:
        """Record a heartbeat; False when the identity is not a registered endpoint."""
        ep = self._endpoint(identity)
        if ep is None:
            return False
        ep.last_seen, ep.connected = self._time(), True
        valid = self._valid_info(ep.name, info)
        if valid is not None:  # a bad one keeps the last good info
            ep.info = valid
        return True

    @staticmethod
    def _valid_info(name: str, info: Any) -> dict | None:
        """The endpoint's info if every field checks out, else None (logged, naming the field),
        so no malformed report reaches /metrics or `dlhub status`."""
        problem = m.check_heartbeat_info(info)
        if problem:
            log.warning("endpoint %r sent malformed heartbeat info, ignored: %s", name, problem)
            return None
        return dict(info)

    def endpoint_gone(self, identity: bytes) -> None:
        """The endpoint said goodbye: its tasks wait (re-sent when it registers again)."""
        ep = self._endpoint(identity)
        if ep is not None:
            ep.connected = False

    def endpoint_results(
        self, identity: bytes, results: list[list], uncacheable: frozenset = frozenset()
    ) -> None:
        """``uncacheable``: tasks whose result names an output stored for their caller (another
        caller could not download it): neither cached nor given to identical calls."""
        ep = self._endpoint(identity)
        results = self._valid_results(ep, results)
        for res in results:
            if not self._from_dispatched(ep, res[m.R_ID], "a result"):
                continue
            self._finish(res, ep, res[m.R_ID] not in uncacheable)
            if ep is not None:
                ep.last_seen = self._time()

    def _valid_results(self, ep: EndpointState | None, results: list[list]) -> list[list]:
        """Results whose fields check out; a malformed one is logged and its task fails with a
        ``protocol`` error saying what was wrong (rather than staying unfinished forever)."""
        problems = [m.check_result(res) for res in results]
        if not any(problems):
            return results
        valid = []
        for res, problem in zip(results, problems):
            if not problem:
                valid.append(res)
                continue
            name = ep.name if ep is not None else "?"
            log.warning(
                "endpoint %r sent a malformed result for task %s: %s", name, res[m.R_ID].hex(), problem
            )
            message = f"endpoint {name!r} sent a malformed result: {problem}"
            valid.append(
                m.result_record(res[m.R_ID], "failed", None, errors.infra_error("protocol", message))
            )
        return valid

    def endpoint_states(self, identity: bytes, updates: list[list]) -> None:
        changes = []
        ep = self._endpoint(identity)
        for task_id, state, ts in updates:
            entry = self.tasks.get(task_id)
            if entry is None or entry.state in m.TERMINAL_STATES or state not in m.TASK_STATES:
                continue
            if not self._from_dispatched(ep, task_id, "a state"):
                continue
            entry.state = state
            col = "t_started" if state == "running" else "t_dispatched"
            changes.append((task_id, {"state": state, col: ts}))
        if changes:
            self._write(ev.PersistUpdates(changes))

    def endpoint_cancel_refused(self, identity: bytes, msg: m.CancelRefused) -> None:
        by_client: dict[bytes, list] = {}
        ep = self._endpoint(identity)
        for task_id in msg.task_ids:
            entry = self.tasks.get(task_id)
            if entry is not None and self._from_dispatched(ep, task_id, "a cancel answer"):
                by_client.setdefault(entry.client, []).append(task_id)
        for client, ids in by_client.items():
            self.outbox.append(("client", client, m.CancelRefused(ids, msg.reason)))

    def _from_dispatched(self, ep: EndpointState | None, task_id: bytes, what: str) -> bool:
        """Whether news of ``task_id`` comes from the endpoint it was dispatched to (or is about a
        task this manager no longer holds: acknowledged again, changes nothing). Any other
        endpoint's is dropped with a warning naming both."""
        entry = self.tasks.get(task_id)
        if entry is None or (ep is not None and ep.name == entry.endpoint):
            return True
        log.warning(
            "dropped %s for task %s from endpoint %r: that task was dispatched to %r",
            what,
            task_id.hex(),
            ep.name if ep is not None else "(unregistered)",
            entry.endpoint,
        )
        return False

    def tick(self) -> None:
        """Mark endpoints whose heartbeats stopped as disconnected (their tasks wait)."""
        now = self._time()
        for ep in self.endpoints.values():
            if ep.connected and now - ep.last_seen > self.endpoint_timeout_s:
                ep.connected = False
            if ep.recent:
                fair_share.forget_idle_users(ep, now)


def held_ids(info: Any) -> tuple[frozenset[bytes], Any]:
    """The task ids an endpoint's Hello says it holds (``info["held"]``: the ids concatenated,
    16 bytes each; queued, running, or finished with the result not yet acknowledged), and the
    info without them. Malformed or absent: none held (everything in flight is sent again)."""
    if not isinstance(info, dict) or "held" not in info:
        return frozenset(), info
    raw = info["held"]
    info = {k: v for k, v in info.items() if k != "held"}
    n = m.TASK_ID_BYTES
    if not isinstance(raw, bytes) or len(raw) % n:
        log.warning("an endpoint's Hello held malformed task ids (%s), ignored", type(raw).__name__)
        return frozenset(), info
    return frozenset(raw[i : i + n] for i in range(0, len(raw), n)), info
