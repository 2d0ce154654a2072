"""Servables inside the manager: name resolution for routing, verification after publish, and
calls made by the manager itself (REST runs).

    REST publish --> Repository.publish (pending) --> verify(): a task ``verify:<digest>`` to an
        endpoint; its JSON report --> mark_ready | mark_failed (on a background thread)
    client task ``ref:owner/name[:v]`` --> Router --> resolve() --> ``servable:<digest>``
    REST run --> run(): the same path as a client task; the result comes back to a Future

Internal tasks go through the Router like any client's (stored, re-queued after a restart,
cancellable), with a callback instead of a client identity. Their results are serialized as JSON
by the worker, so the manager can read them without unpickling anything.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dlhub.protocol import errors
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import JSON, input_digest, serialize
from dlhub.protocol.servable import ServableRecord, parse_ref, record_digest

from . import events as ev
from .repository import Access, NotFound, Repository, Viewer, no_servable

if TYPE_CHECKING:
    from .broker import Manager

log = logging.getLogger("dlhub.manager.servables")

VERIFY_TIMEOUT_S = 600.0
WHO_TTL_S = 1.0  # how long a user's role and groups are remembered for visibility checks


class ServableService:
    def __init__(self, manager: Manager, repository: Repository):
        self.manager = manager
        self.repository = repository
        self._resolved: dict[str, str] = {}
        self._access: dict[tuple[str, str], Access] = {}  # (owner, name) -> visibility + shares
        self._viewers: dict[str, tuple[float, Viewer]] = {}  # user -> (when looked up, viewer)
        self._generation = -1
        self._deterministic: dict[str, bool] = {}  # "servable:<digest>" -> record.deterministic
        self._owners: dict[str, str] = {}  # record digest -> owner
        # the caches are shared by the loop and the REST threads: changes that read-then-write
        # (a generation change, an entry looked up under an older generation) hold this lock
        self._lock = threading.Lock()
        # repository writes triggered by results, off the broker loop
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dlhub-verify")

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # ---- routing (loop thread) -------------------------------------------------------------

    def resolve(self, ref: str, user: str | Viewer | None = None) -> str:
        """``owner/name[:version]`` -> ``servable:<digest>``; cached until the repository changes.
        ``user`` (the submitter): a servable that user may not see is not found, in the same
        words as one that does not exist (None: no check, for the manager's own calls)."""
        generation = self._check_generation()
        if user is not None:
            try:
                owner, name, version = parse_ref(ref)
            except ValueError as exc:
                raise errors.ServableNotFound(str(exc)) from None
            if not self.may_see(user, owner, name):
                raise errors.ServableNotFound(no_servable(owner, name, version))
        key = self._resolved.get(ref)
        if key is None:
            try:
                owner, name, version = parse_ref(ref)
                record, digest = self.repository.resolve(owner, name, version)
            except (NotFound, ValueError) as exc:
                raise errors.ServableNotFound(str(exc)) from None
            key = m.RUN_PREFIX + digest
            self._deterministic[key] = record.deterministic
            self._keep(self._resolved, ref, key, generation)
        return key

    def _check_generation(self) -> int:
        """Forget resolved names and access records when the repository changed (publish,
        delete, status, visibility, shares all bump its generation); returns the generation."""
        generation = self.repository.generation
        with self._lock:
            if self._generation != generation:
                self._resolved.clear()
                self._access.clear()
                self._generation = generation
        return generation

    def _keep(self, cache: dict, key: Any, value: Any, generation: int) -> None:
        """Cache ``value`` unless the repository changed since the lookup began."""
        with self._lock:
            if self._generation == generation:
                cache[key] = value

    # ---- visibility (any thread: the loop, REST) -------------------------------------------

    def viewer(self, user: str, role: str | None = None) -> Viewer:
        """The user, whether an admin (``role`` when the caller knows it, else the users
        table), and their groups; remembered for ``WHO_TTL_S`` so revocations and group changes
        take effect within a second."""
        now = time.monotonic()
        cached = self._viewers.get(user)
        stale = cached is None or now - cached[0] > WHO_TTL_S
        if stale or (role is not None and role_admin(role) != cached[1].admin):
            if role is None:
                role = self._role(user)
            cached = (now, Viewer(user, role_admin(role), self._groups(user)))
            with self._lock:
                if len(self._viewers) > 10_000:
                    self._viewers.clear()
                self._viewers[user] = cached
        return cached[1]

    def _role(self, user: str) -> str | None:
        from .store import users_table

        with self.repository.engine.connect() as conn:
            return conn.execute(sa.select(users_table.c.role).where(users_table.c.name == user)).scalar()

    def _groups(self, user: str) -> frozenset[str]:
        from . import auth

        lookup = getattr(getattr(self.manager, "auth", None), "groups_of", None)
        if lookup is not None:
            return frozenset(lookup(user))
        return frozenset(auth.groups_of(self.repository.engine, user))

    def access(self, owner: str, name: str) -> Access:
        """Visibility and shares of ``owner/name``, cached until the repository changes."""
        generation = self._check_generation()
        found = self._access.get((owner, name))
        if found is None:
            found = self.repository.access(owner, name)
            self._keep(self._access, (owner, name), found, generation)
        return found

    def may_see(self, who: str | Viewer, owner: str, name: str) -> bool:
        """Whether ``who`` may find and run ``owner/name``: cheap for the common cases (public,
        own), a cached viewer lookup for the rest."""
        user = who.user if isinstance(who, Viewer) else who
        if user == owner:
            return True
        access = self.access(owner, name)
        if access.visibility == "public" or user in access.users:
            return True
        return access.allows(owner, who if isinstance(who, Viewer) else self.viewer(user))

    def visible_status(self, status: dict[str, Any], who: str | Viewer) -> dict[str, Any]:
        """The status snapshot without per-servable figures of servables ``who`` may not see."""
        viewer = who if isinstance(who, Viewer) else self.viewer(who)
        if viewer.admin:
            return status
        endpoints = {}
        for ep_name, ep in (status.get("endpoints") or {}).items():
            info = ep.get("info") or {}
            stats = info.get("servables")
            if isinstance(stats, dict):
                kept = {label: v for label, v in stats.items() if self._label_visible(label, viewer)}
                ep = {**ep, "info": {**info, "servables": kept}}
            endpoints[ep_name] = ep
        return {**status, "endpoints": endpoints}

    def _label_visible(self, label: str, viewer: Viewer) -> bool:
        """An endpoint labels servables ``owner/name:version`` (or ``servable:<digest>``);
        other labels (functions sent by value) name no servable."""
        if isinstance(label, str) and label.startswith(m.RUN_PREFIX):
            record = self.repository.record_by_digest(label[len(m.RUN_PREFIX) :])
            if record is None:
                return False
            owner, name = record.get("owner") or "", record.get("name") or ""
        else:
            try:
                owner, name, _ = parse_ref(label)
            except (ValueError, TypeError):
                return True
        return self.may_see(viewer, owner, name)

    def deterministic(self, function: str) -> bool:
        """Whether the servable a task runs declared same-inputs-same-output (cacheable)."""
        known = self._deterministic.get(function)
        if known is None:  # e.g. a task recovered after a restart, never resolved here
            record = self.repository.record_by_digest(function[len(m.RUN_PREFIX) :])
            known = self._deterministic[function] = bool(record and record.get("deterministic"))
        return known

    def owner_of(self, digest: str) -> str | None:
        """The owner of the servable version with this record digest (for endpoint policies)."""
        known = self._owners.get(digest)
        if known is None:
            record = self.repository.record_by_digest(digest)
            known = record.get("owner") if record else None
            if known is not None:
                self._owners[digest] = known  # a version's owner never changes
        return known

    def status(self) -> dict[str, Any]:
        return self.manager.status()

    # ---- endpoints ---------------------------------------------------------------------------

    def default_endpoint(self, wanted: str | None) -> str:
        """The endpoint named, else the manager's default endpoint (``--default-endpoint``) if it
        is known, else the only connected one. Raises ``UnknownEndpoint``, or ``EndpointRequired``
        (neutral wording: each front end says how its user names one)."""
        endpoints = self.manager.endpoints_connected()  # from the loop, which owns the Router
        if wanted:
            if wanted not in endpoints:  # a Globus Compute UUID names an endpoint too
                from dlhub.protocol.gc_serialize import endpoint_uuid

                by_uuid = {endpoint_uuid(name): name for name in endpoints}
                if wanted in by_uuid:
                    return by_uuid[wanted]
                raise errors.UnknownEndpoint(
                    f"endpoint {wanted!r} is not registered (known: {', '.join(sorted(endpoints)) or 'none'})"
                )
            return wanted
        return errors.choose_endpoint(endpoints, self.manager.config.default_endpoint)

    # ---- calls made by the manager ---------------------------------------------------------

    def submit(
        self,
        owner: str,
        endpoint: str,
        function: str,
        args: list,
        kwargs: dict,
        timeout_s: float | None = None,
        cache: bool = True,
        committed: concurrent.futures.Future | None = None,
    ) -> tuple[bytes, concurrent.futures.Future]:
        """Queue a task as ``owner``; the future gets its result record (JSON-serialized result).
        ``committed`` (optional) is set once the task's row is in the database, where a REST
        caller's poll reads it."""
        task_id = os.urandom(m.TASK_ID_BYTES)
        payload = serialize([list(args), dict(kwargs)], "msgpack")
        options = None
        if function.startswith(m.REF_PREFIX):
            key = input_digest(args, kwargs) if cache else None
            options = {"key": key} if key else {"cache": False}
            if args and hasattr(args[0], "__len__"):
                options["len"] = len(args[0])
        rec = m.task_record(task_id, function, payload, timeout_s, "json", None, options)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def done(res: list) -> None:
            if not future.done():
                future.set_result(res)

        def enqueue() -> None:
            msg = m.Submit(endpoint, [rec])
            submitted = ev.ClientSubmitted(b"", owner, "manager", msg, time.time(), done)
            self.manager.route(submitted)  # the row's write is enqueued by now: commit after it
            if committed is not None:
                self.manager.store.after_commit(lambda: committed.done() or committed.set_result(True))

        self.manager.call_soon(enqueue)
        return task_id, future

    def verify(self, record: ServableRecord, endpoint: str, user: str | None = None) -> None:
        """Run the version's examples on ``endpoint`` as ``user`` (the publisher, whom the
        endpoint's policy checks; default the owner); mark it ready or failed by the report."""
        owner, name, version = record.owner, record.name, record.version
        function = m.VERIFY_PREFIX + record_digest(record)
        _, future = self.submit(user or owner, endpoint, function, [], {}, VERIFY_TIMEOUT_S)

        def finished(fut: concurrent.futures.Future) -> None:
            res = fut.result()
            error = verification_error(res, endpoint)
            try:
                if error is None:
                    self.repository.mark_ready(owner, name, version)
                    log.info("%s verified on %s: ready", record.ref, endpoint)
                else:
                    self.repository.mark_failed(owner, name, version, error)
                    log.warning("%s failed verification on %s: %s", record.ref, endpoint, error)
            except NotFound:  # deleted while it was being verified
                log.info("%s changed during verification; left as it is", record.ref)
            except Exception:  # the executor would drop it silently: the version stays pending
                log.exception("cannot record the verification of %s", record.ref)

        future.add_done_callback(lambda fut: self._writer.submit(finished, fut))


def role_admin(role: str | None) -> bool:
    return role == "admin"


def result_value(res: list) -> Any:
    """The value of a succeeded internal task (JSON only: the manager never unpickles)."""
    payload = res[m.R_PAYLOAD]
    if not payload or payload[0] != JSON:
        raise errors.SerializationError("the result is not JSON")
    return json.loads(bytes(payload[1:]))


def verification_error(res: list, endpoint: str) -> str | None:
    """None when the verify task's report says every example passed, else why not."""
    if res[m.R_STATE] != "succeeded":
        error = res[m.R_ERROR] or ["lost", f"verification ended {res[m.R_STATE]}", "", None]
        return f"on endpoint {endpoint}: {error[1]}"
    try:
        report = result_value(res)
    except (errors.SerializationError, ValueError) as exc:
        return f"on endpoint {endpoint}: unreadable verification report ({exc})"
    if not isinstance(report, dict) or not report.get("ok"):
        detail = report.get("error") if isinstance(report, dict) else report
        return f"on endpoint {endpoint}: {detail}"
    return None
