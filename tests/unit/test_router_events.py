"""The Router as a state machine (issue 11, item 1): typed events in, instructions out, no clock
read and no write of its own when driven through ``handle``; sends held until ``Flush`` (results
that arrive together leave together); a logged run replays into a fresh Router to the same state."""

from __future__ import annotations

import pytest

from dlhub.manager import events as ev
from dlhub.manager.routing import Router
from dlhub.protocol import messages as m

CLIENT, EP_ID = b"c:client-1", b"e:ep:s1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def task(n: int) -> list:
    return m.task_record(tid(n), "sha256:f", b"\x01\x90", None, "auto")


def hello() -> m.Hello:
    return m.Hello("endpoint", "ep", "tok", "s1", {"python": "3.11.7"}, {"pid": 1})


def no_clock() -> float:
    raise AssertionError("the Router read the clock")


class NoStore:
    """Whatever the Router would write itself fails the test: writes must be instructions."""

    def __getattr__(self, name):
        raise AssertionError(f"the Router called store.{name}")


def router(**kwargs) -> Router:
    return Router(NoStore(), clock=no_clock, emit=True, **kwargs)


def sends(instructions) -> list[ev.Send]:
    return [i for i in instructions if isinstance(i, ev.Send)]


def test_events_in_instructions_out_without_clock_or_io():
    r = router()
    out = r.handle(
        ev.EndpointRegistered(EP_ID, hello(), "alice", 100.0),
        ev.ClientSubmitted(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2)]), 101.0),
    )
    (received,) = [i for i in out if isinstance(i, ev.PersistReceived)]
    assert [row["task_id"] for row in received.rows] == [tid(1), tid(2)]
    assert {row["t_received"] for row in received.rows} == {101.0}  # the event's time
    assert [a[2] for a in received.acks] == [tid(1), tid(2)]
    assert not sends(out)  # held until Flush

    flushed = r.handle(ev.Flush())
    assert [(s.link, s.identity, type(s.msg)) for s in flushed] == [
        ("endpoint", EP_ID, m.Welcome),
        ("endpoint", EP_ID, m.Tasks),
    ]
    assert [t[m.T_ID] for t in flushed[1].msg.tasks] == [tid(1), tid(2)]


def test_results_that_arrive_together_leave_in_one_message():
    r = router()
    r.handle(
        ev.EndpointRegistered(EP_ID, hello(), "alice", 100.0),
        ev.ClientSubmitted(CLIENT, "alice", "s", m.Submit("ep", [task(1), task(2)]), 101.0),
        ev.Flush(),
    )
    out = r.handle(
        ev.EndpointResultsArrived(EP_ID, [m.result_record(tid(1), "succeeded", b"\x01\x05")], 102.0),
        ev.EndpointResultsArrived(EP_ID, [m.result_record(tid(2), "succeeded", b"\x01\x06")], 102.5),
    )
    finished = [c for i in out if isinstance(i, ev.PersistUpdates) for c in i.changes]
    assert [(task_id, change["t_finished"]) for task_id, change in finished] == [
        (tid(1), 102.0),
        (tid(2), 102.5),
    ]
    (results,) = sends(r.handle(ev.Flush()))
    assert results.identity == CLIENT and isinstance(results.msg, m.Results)
    assert [res[m.R_ID] for res in results.msg.results] == [tid(1), tid(2)]
    assert not r.tasks  # both terminal


def test_an_internal_task_result_is_a_notify_instruction():
    r = router()
    got: list = []
    r.handle(
        ev.EndpointRegistered(EP_ID, hello(), "admin", 100.0),
        ev.ClientSubmitted(b"", "admin", "manager", m.Submit("ep", [task(3)]), 101.0, got.append),
        ev.Flush(),
    )
    out = r.handle(
        ev.EndpointResultsArrived(EP_ID, [m.result_record(tid(3), "succeeded", b"\x01\x07")], 102.0)
    )
    (notify,) = [i for i in out if isinstance(i, ev.Notify)]
    assert not got  # the Router calls nothing itself
    notify.callback(notify.result)
    assert got[0][m.R_ID] == tid(3)


def test_a_logged_run_replays_into_a_fresh_router_to_the_same_state(tmp_path):
    log = tmp_path / "router-events.log"
    original = router(event_log=str(log))
    said = []
    for batch in (
        [ev.EndpointRegistered(EP_ID, hello(), "alice", 100.0)],
        [ev.ClientSubmitted(CLIENT, "alice", "s", m.Submit("ep", [task(n) for n in range(1, 6)]), 101.0)],
        [ev.Flush()],
        [ev.EndpointResultsArrived(EP_ID, [m.result_record(tid(2), "succeeded", b"\x01\x05")], 102.0)],
        [ev.ClientCancelled(CLIENT, [tid(4)], "alice"), ev.Tick(140.0), ev.Flush()],
    ):
        said.extend(original.handle(*batch))
    original.event_log.close()

    fresh = router()
    replayed = ev.replay(log, fresh)
    assert replayed == said
    assert sorted(fresh.tasks) == sorted(original.tasks) == [tid(1), tid(3), tid(4), tid(5)]
    assert {t: e.state for t, e in fresh.tasks.items()} == {t: e.state for t, e in original.tasks.items()}
    assert dict(fresh.finished) == dict(original.finished) == {tid(2): "succeeded"}
    assert fresh.endpoints["ep"].connected is False  # the tick at 140 s: its heartbeats stopped


def test_an_unknown_event_is_a_type_error():
    with pytest.raises(TypeError, match="no handler"):
        router().handle(ev.Event())
