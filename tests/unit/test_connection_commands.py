"""The client's I/O thread takes typed, frozen commands (issue 11, item 2), not string-tagged
tuples; the hot path's cheaper SendTask constructor builds the same object."""

from __future__ import annotations

import dataclasses

import pytest

from dlhub.executor import connection as c


def claim() -> bool:
    return True


def test_the_fast_task_constructor_builds_the_same_frozen_command():
    rec = [b"\x01" * 16, "sha256:x", b"payload", None, "pickle", None]
    fast = c._send_task("ep", claim, rec)
    assert type(fast) is c.SendTask
    assert fast == c.SendTask("ep", claim, rec)
    assert (fast.endpoint, fast.claim, fast.rec) == ("ep", claim, rec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.endpoint = "other"  # type: ignore[misc]
    assert not hasattr(fast, "__dict__")  # slots: no per-object dict on the hot path


def test_every_command_is_a_frozen_slotted_dataclass_and_every_old_tuple_kind_maps_to_one():
    for kind, cls in c._TUPLE_KINDS.items():
        params = cls.__dataclass_params__
        assert params.frozen, kind
        assert "__slots__" in cls.__dict__, kind
    assert c._TUPLE_KINDS["cancel"](*([b"x"],)) == c.SendCancel([b"x"])
    assert c._TUPLE_KINDS["query"](7, [b"x"]) == c.SendQuery(7, [b"x"])
    assert c._TUPLE_KINDS["status"](7) == c.SendStatus(7)
