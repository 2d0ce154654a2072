"""A task's values as the Router stores and shows them, without the database layer.

The columns it writes in a task's row: resources and options as JSON text (:func:`_json`,
remembered, as the same ones come with every call) and an error record packed as the store keeps
it (:func:`_pack_error`); the error of a task cancelled before it started; and who may see a task
(:func:`may_see`, also the broker's check on rows it reads for Query and Fetch).

Apart from routing.py because these are pure functions of their arguments (the JSON memo aside)
with no Router state; ``manager/store.py`` is not imported, so the Router stays free of SQLAlchemy.
"""

from __future__ import annotations

import json

import msgpack

from dlhub.protocol import errors


def may_see(user: str | None, owner: str) -> bool:
    """Whether ``user`` may see a task of ``owner`` (None: an admin, who may see all)."""
    return user is None or user == owner


def _cancelled_error() -> list:
    return errors.infra_error("cancelled", "task was cancelled before it started")


_JSON_MEMO: dict[tuple, str] = {}
_JSON_MEMO_MAX = 1024
_MEMO_SCALARS = (str, int, bool, type(None))  # exact types: True and 1 must not share a key


def _json(value: dict) -> str:
    """``json.dumps(value)`` of a task's resources or options, remembered: a caller sends the
    same ones with every call (e.g. its outputs' upload grant), and dumping them again cost
    more than the rest of storing the task. Only mappings of str, int, bool, None and lists of
    str are remembered (their key holds each value's exact type); anything else (floats, whose
    0.0 and -0.0 are equal, nested values) is dumped each time."""
    key = []
    for k, v in value.items():
        t = type(v)
        if t in _MEMO_SCALARS:
            key.append((k, t, v))
        elif t is list and all(type(x) is str for x in v):
            key.append((k, t, tuple(v)))
        else:
            return json.dumps(value)
    key = tuple(key)
    text = _JSON_MEMO.get(key)
    if text is None:
        text = json.dumps(value)
        if len(_JSON_MEMO) >= _JSON_MEMO_MAX:
            _JSON_MEMO.clear()
        _JSON_MEMO[key] = text
    return text


def _pack_error(record: list | None) -> bytes | None:
    """An error record as the store keeps it (``store.pack_error``; not imported from there: the
    Router stays free of the database layer). Most results have none: no call then."""
    return None if record is None else msgpack.packb(record, use_bin_type=True)
