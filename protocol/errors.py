"""Typed dlhub errors and the wire error record.

Errors cross the wire as ``[code, message, traceback_text, exception]`` where ``exception`` is an
optional pickled exception whose round trip was checked on the worker. The manager never opens
that blob; only the submitting client does, and it falls back to a typed :class:`RemoteError`
carrying the traceback text when the original type cannot be rebuilt.
"""

from __future__ import annotations

import traceback
from typing import Any


class DLHubError(Exception):
    """Base class of every error dlhub raises itself."""

    code = "error"


class ProtocolError(DLHubError):
    """A frame was malformed, truncated, oversized or of another protocol version."""

    code = "protocol"


class PayloadTooLarge(DLHubError):
    """A payload or a result exceeds the configured size limit."""

    code = "payload-too-large"

    def __init__(self, size: int, limit: int, what: str = "payload", hint: str = ""):
        message = f"{what} of {size:,} bytes exceeds the limit of {limit:,} bytes"
        super().__init__(f"{message}; {hint}" if hint else message)
        self.size, self.limit = size, limit


# How to raise each limit, where it is enforced (a user who hits one needs to know which knob).
RAISE_CLIENT_LIMIT = "raise it with Executor(payload_limit_bytes=...)"
RAISE_MANAGER_LIMIT = "the manager's limit is raised with `dlhub-manager serve --payload-limit-mb N`"
RAISE_RESULT_LIMIT = (
    "raise `payload_limit_bytes` in the endpoint's config.yaml (and the manager's "
    "`dlhub-manager serve --payload-limit-mb N`), or return a smaller result"
)


class AccessDenied(DLHubError):
    """The token was refused or does not allow the request."""

    code = "access-denied"


class QuotaExceeded(DLHubError):
    """The submitter already has as many tasks open (queued or running) as the manager allows
    one user; the message names the limit and the flag that sets it."""

    code = "quota-exceeded"


RAISE_QUOTA = "the limit is set by `dlhub-manager serve --max-open-tasks-per-user N`"


class ManagerUnreachable(DLHubError):
    """No manager answered at the configured address in time."""

    code = "manager-unreachable"


class UnknownEndpoint(DLHubError):
    """The task names an endpoint the manager has never seen."""

    code = "unknown-endpoint"


class EndpointRequired(DLHubError, ValueError):
    """Several endpoints could take the request and none is the default: the caller must name
    one. ``reason`` is neutral; each front end adds how its user names one (``hint``)."""

    code = "endpoint-required"

    def __init__(self, reason: str, candidates: list[str] | tuple[str, ...] = (), hint: str = ""):
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason, self.candidates, self.hint = reason, list(candidates), hint

    def with_hint(self, hint: str) -> EndpointRequired:
        """The same error, worded for one front end (``--endpoint``, ``endpoint=...``)."""
        return EndpointRequired(self.reason, self.candidates, hint)


def choose_endpoint(endpoints: dict[str, bool], default: str | None = None) -> str:
    """The endpoint for a request that names none: ``default`` if the manager knows it, else
    the only connected one (else the only known one). ``endpoints``: name -> connected.
    Raises :class:`UnknownEndpoint` when there is none, :class:`EndpointRequired` when it is
    ambiguous."""
    if default and default in endpoints:
        return default
    connected = sorted(name for name, up in endpoints.items() if up)
    candidates = connected or sorted(endpoints)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UnknownEndpoint("no endpoint is registered with this manager")
    why = f"the default endpoint {default!r} is not registered" if default else "no default endpoint is set"
    state = "connected" if connected else "registered (none is connected)"
    raise EndpointRequired(f"several endpoints are {state} ({', '.join(candidates)}) and {why}", candidates)


class EndpointLost(DLHubError):
    """The endpoint went away while it held the task."""

    code = "endpoint-lost"


class WorkerLost(DLHubError):
    """The worker process running the task died (it crashed, exited or was killed)."""

    code = "worker-lost"


class TaskLost(DLHubError):
    """Infrastructure failed the task after every retry (e.g. its block ended)."""

    code = "lost"


class TaskTimeout(DLHubError):
    """The task ran longer than its time limit."""

    code = "task-timeout"


class TaskCancelled(DLHubError):
    """The task was cancelled before it started."""

    code = "cancelled"


class ResourceUnavailable(DLHubError):
    """No pool of the endpoint offers the resources the task asked for."""

    code = "resources"


class SerializationError(DLHubError):
    """A value could not be serialized or deserialized (its type is named in the message)."""

    code = "serialization"


class VersionMismatch(DLHubError):
    """Python or dill versions differ between the submitting process and the worker."""

    code = "version-mismatch"


class ServableNotFound(DLHubError, LookupError):
    """No routable version of the servable: unknown, deleted, failed or still being verified."""

    code = "servable-not-found"


class ServableLoadError(DLHubError):
    """A servable cannot be loaded at the endpoint (unmet requirement, bad file, failing import)."""

    code = "servable-load"


class RemoteError(DLHubError):
    """A remote exception whose original type could not be rebuilt here."""

    code = "remote"

    def __init__(self, message: str, traceback_text: str = "", remote_type: str = ""):
        super().__init__(message)
        self.traceback_text = traceback_text
        self.remote_type = remote_type

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.args[0]}" if self.remote_type else str(self.args[0])


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` of re-raised exceptions."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


ERROR_TYPES: dict[str, type[DLHubError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        PayloadTooLarge,
        AccessDenied,
        QuotaExceeded,
        ManagerUnreachable,
        UnknownEndpoint,
        EndpointLost,
        WorkerLost,
        TaskLost,
        TaskTimeout,
        TaskCancelled,
        ResourceUnavailable,
        SerializationError,
        VersionMismatch,
        ServableNotFound,
        ServableLoadError,
    )
}


def error_record(exc: BaseException, code: str | None = None) -> list[Any]:
    """Build the wire record of ``exc``; pickle it only when the pickle round-trips."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    blob: bytes | None = None
    try:
        import dill

        candidate = dill.dumps(exc, protocol=5)
        dill.loads(candidate)
        blob = candidate
    except Exception:
        blob = None
    if code is None:
        code = exc.code if isinstance(exc, DLHubError) else "remote"
    return [code, f"{type(exc).__name__}: {exc}", tb_text, blob]


def infra_error(code: str, message: str) -> list[Any]:
    """A record for failures that did not come from user code (no traceback, no blob)."""
    return [code, message, "", None]


def exception_from_record(record: list[Any] | tuple[Any, ...]) -> BaseException:
    """Rebuild the exception for the caller, with the remote traceback as ``__cause__``."""
    # check_result admits [code, message] up to [code, message, traceback, blob]
    code, message, tb_text, blob = (*record, None, None)[:4]
    tb_text = tb_text or ""
    if code in ERROR_TYPES and not blob:
        cls = ERROR_TYPES[code]
        infra = cls.__new__(cls)
        Exception.__init__(infra, message)
        return infra
    exc: BaseException | None = None
    if blob:
        try:
            import dill

            exc = dill.loads(blob)
        except Exception:
            exc = None
        if exc is not None and not isinstance(exc, BaseException):
            exc = None
    if exc is None:
        remote_type, _, text = message.partition(": ")
        exc = RemoteError(text or message, tb_text, remote_type)
    if tb_text:
        exc.__cause__ = RemoteTraceback(tb_text)
    return exc
