"""Validation of what endpoints and pools report: the manager trusts none of it.

The manager validates every report an endpoint or pool sends; nothing there is trusted. An
endpoint's Heartbeat (and Hello) info and a pool's heartbeat come from processes the manager does
not control and end up in ``/metrics``, ``/api/v1/metrics`` and ``dlhub status``, so each field is
checked before it is used: counts are integers >= 0, rates numbers, histogram buckets whole
numbers, anything else plain JSON data (str keys, bounded depth). Each check returns what is
wrong, naming the field, or None. :mod:`.messages` re-exports the public names; the check of a
result record (:func:`.messages.check_result`) stays there, with the record layout it reads.
Depends on the standard library only.
"""

from __future__ import annotations

from typing import Any

_COUNT = "count"  # an int >= 0 (not a bool)
# known Heartbeat info keys (endpoint -> manager) and what each must be; unknown keys must be
# plain JSON data (so /api/v1/metrics can always encode them)
HEARTBEAT_FIELDS: dict[str, Any] = {
    "workers": _COUNT,
    "queued": _COUNT,
    "outstanding": _COUNT,
    "busy_workers": _COUNT,
    "on_workers": _COUNT,
    "received": _COUNT,
    "completed": _COUNT,
    "failed": _COUNT,
    "worker_lost": _COUNT,
    "requeued": _COUNT,
    "heartbeat_s": "number",
    "queued_by_pool": {"*": _COUNT},
    "servables": {"*": {"*": "number"}},
    "pools": {"*": {"workers": _COUNT, "*": "json"}},
    "batching": {
        "batch_size_histogram": "histogram",
        "queue_delay_ms": {"count": _COUNT, "*": "number?"},
        "*": "json",
    },
}
_MAX_DEPTH = 8
_MAX_NUMBER = 2**63 - 1


def _check_json(value: Any, where: str, depth: int = 0) -> str | None:
    if depth > _MAX_DEPTH:
        return f"{where}: nested too deep"
    if value is None or isinstance(value, (str, bool)):
        return None
    if isinstance(value, (int, float)):
        return (
            None if isinstance(value, bool) or abs(value) <= _MAX_NUMBER else f"{where}: {value!r} too large"
        )
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = _check_json(item, f"{where}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: key {key!r} is not a string"
            problem = _check_json(item, f"{where}.{key}", depth + 1)
            if problem:
                return problem
        return None
    return f"{where} must be plain data (JSON), got {type(value).__name__}"


def _check_spec(value: Any, spec: Any, where: str, depth: int = 0) -> str | None:
    if spec == "json":
        return _check_json(value, where, depth)
    if spec == "histogram":  # {"<bucket bound>": count}
        if not isinstance(value, dict):
            return f"{where} must be a mapping, got {type(value).__name__}"
        for key in value:
            if not isinstance(key, str) or not key.isdigit() or len(key) > 18:
                return f"{where}: bucket {key!r} is not a whole number"
        return _check_spec(value, {"*": _COUNT}, where, depth)
    if spec in (_COUNT, "number", "number?"):
        if value is None and spec == "number?":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float) if spec != _COUNT else int):
            wanted = "an integer" if spec == _COUNT else "a number"
            return f"{where} must be {wanted}, got {type(value).__name__}"
        if value != value or abs(value) > _MAX_NUMBER:  # NaN, huge
            return f"{where} is out of range: {value!r}"
        if spec == _COUNT and value < 0:
            return f"{where} must not be negative, got {value!r}"
        return None
    if not isinstance(value, dict):
        return f"{where} must be a mapping, got {type(value).__name__}"
    for key, item in value.items():
        if not isinstance(key, str):
            return f"{where}: key {key!r} is not a string"
        sub = spec.get(key, spec.get("*", "json"))
        problem = _check_spec(item, sub, f"{where}.{key}", depth + 1)
        if problem:
            return problem
    return None


def check_heartbeat_info(info: Any) -> str | None:
    """What is wrong with an endpoint's Heartbeat (or Hello) info, naming the field; None when
    it is fine. Counts are integers >= 0, rates numbers, everything else plain JSON data."""
    if not isinstance(info, dict):
        return f"info must be a mapping, got {type(info).__name__}"
    return _check_spec(info, {**HEARTBEAT_FIELDS, "*": "json"}, "info")


def check_plain_data(value: Any, where: str) -> str | None:
    """What keeps ``value`` from being plain JSON data (str keys, bounded depth), or None."""
    return _check_json(value, where)


def check_pool_info(info: Any) -> str | None:
    """What is wrong with a pool's Heartbeat info (``workers`` a count, the rest plain data)."""
    if not isinstance(info, dict):
        return f"info must be a mapping, got {type(info).__name__}"
    return _check_spec(info, {"workers": _COUNT, "*": "json"}, "info")
