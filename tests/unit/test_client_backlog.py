"""The manager's client backlog (``manager/client_backlog.py``): the rest of a sliced Submit goes
first in its client's line, that client's later frames wait behind it, clients take turns, and
past its limit the backlog says it is full."""

from __future__ import annotations

from itertools import islice

from dlhub.manager.client_backlog import ClientBacklog
from dlhub.protocol import messages as m


def submit(n: int) -> m.Submit:
    return m.Submit("ep", [m.task_record(bytes([n]) * m.TASK_ID_BYTES, "sha256:f", b"")])


def test_a_clients_rest_goes_before_its_later_frames_and_clients_take_turns():
    backlog = ClientBacklog(limit=10)
    assert not backlog and not backlog.waiting(b"a")
    backlog.put_rest(b"a", "sa", submit(1))
    assert backlog.waiting(b"a") and not backlog.waiting(b"b")
    backlog.defer(b"a", "sa", m.Cancel([b"x" * m.TASK_ID_BYTES]))
    backlog.put_rest(b"b", "sb", submit(2))
    backlog.put_rest(b"a", "sa", submit(3))  # a newer rest of a's: first in a's line
    assert backlog.size == 4
    taken = [(identity, type(msg).__name__, rest) for identity, _, msg, rest in backlog.take()]
    assert taken == [
        (b"a", "Submit", True),
        (b"b", "Submit", True),
        (b"a", "Submit", True),
        (b"a", "Cancel", False),
    ]
    assert not backlog and backlog.size == 0


def test_what_a_turn_did_not_take_stays_in_order_for_the_next():
    backlog = ClientBacklog(limit=10)
    for n in range(3):
        backlog.defer(b"a", "sa", submit(n)) if backlog.waiting(b"a") else backlog.put_rest(
            b"a", "sa", submit(n)
        )
    first = [msg.tasks[0][0][0] for _, _, msg, _ in islice(backlog.take(), 1)]
    rest = [msg.tasks[0][0][0] for _, _, msg, _ in backlog.take()]
    assert first + rest == [0, 1, 2]


def test_the_backlog_is_full_at_its_limit():
    backlog = ClientBacklog(limit=2)
    backlog.put_rest(b"a", "sa", submit(1))
    assert not backlog.full()
    backlog.defer(b"a", "sa", submit(2))
    assert backlog.full()
    next(backlog.take())
    assert not backlog.full()
