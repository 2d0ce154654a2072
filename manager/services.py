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
from typing import TYPE_CHECKING, Any

from dlhub.protocol import errors
from dlhub.protocol import messages as m
from dlhub.protocol.serialize import JSON, input_digest, serialize
from dlhub.protocol.servable import ServableRecord, parse_ref, record_digest

from .repository import NotFound, Repository

if TYPE_CHECKING:
    from .broker import Manager

log = logging.getLogger("dlhub.manager.servables")

VERIFY_TIMEOUT_S = 600.0


class ServableService:
    def __init__(self, manager: Manager, repository: Repository):
        self.manager = manager
        self.repository = repository
        self._resolved: dict[str, str] = {}
        self._generation = -1
        self._deterministic: dict[str, bool] = {}  # "servable:<digest>" -> record.deterministic
        # repository writes triggered by results, off the broker loop
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dlhub-verify")

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # ---- routing (loop thread) -------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """``owner/name[:version]`` -> ``servable:<digest>``; cached until the repository changes."""
        if self._generation != self.repository.generation:
            self._resolved.clear()
            self._generation = self.repository.generation
        key = self._resolved.get(ref)
        if key is None:
            try:
                owner, name, version = parse_ref(ref)
                record, digest = self.repository.resolve(owner, name, version)
            except (NotFound, ValueError) as exc:
                raise errors.ServableNotFound(str(exc)) from None
            key = self._resolved[ref] = m.RUN_PREFIX + digest
            self._deterministic[key] = record.deterministic
        return key

    def deterministic(self, function: str) -> bool:
        """Whether the servable a task runs declared same-inputs-same-output (cacheable)."""
        known = self._deterministic.get(function)
        if known is None:  # e.g. a task recovered after a restart, never resolved here
            record = self.repository.record_by_digest(function[len(m.RUN_PREFIX) :])
            known = self._deterministic[function] = bool(record and record.get("deterministic"))
        return known

    def status(self) -> dict[str, Any]:
        return self.manager.status()

    # ---- endpoints ---------------------------------------------------------------------------

    def default_endpoint(self, wanted: str | None) -> str:
        """The endpoint named, else the manager's default endpoint (``--default-endpoint``) if it
        is known, else the only connected one. Raises ``UnknownEndpoint``, or ``EndpointRequired``
        (neutral wording: each front end says how its user names one)."""
        endpoints = dict(self.manager.router.endpoints)
        if wanted:
            if wanted not in endpoints:
                raise errors.UnknownEndpoint(
                    f"endpoint {wanted!r} is not registered (known: {', '.join(sorted(endpoints)) or 'none'})"
                )
            return wanted
        connected = {name: ep.connected for name, ep in endpoints.items()}
        return errors.choose_endpoint(connected, self.manager.config.default_endpoint)

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
    ) -> tuple[bytes, concurrent.futures.Future]:
        """Queue a task as ``owner``; the future gets its result record (JSON-serialized result)."""
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
            self.manager.router.submit(b"", owner, "manager", m.Submit(endpoint, [rec]), callback=done)

        self.manager.call_soon(enqueue)
        return task_id, future

    def verify(self, record: ServableRecord, endpoint: str) -> None:
        """Run the version's examples on ``endpoint``; mark it ready or failed by the report."""
        owner, name, version = record.owner, record.name, record.version
        function = m.VERIFY_PREFIX + record_digest(record)
        _, future = self.submit(owner, endpoint, function, [], {}, VERIFY_TIMEOUT_S)

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
