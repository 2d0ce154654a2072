"""The Scheduler as a state machine: events in, instructions out, and a log that replays.

``handle(*events)`` applies events (each with the loop's clock reading), dispatches once and
returns what the loop must do; the Scheduler reads no clock and does no I/O. With an event log
set, :func:`dlhub.endpoint.replay.replay` rebuilds the same state in a fresh Scheduler.
"""

from __future__ import annotations

from dlhub.endpoint import events as ev
from dlhub.endpoint.events import EventLog
from dlhub.endpoint.replay import replay
from dlhub.endpoint.scheduler import Scheduler
from dlhub.protocol import messages as m

F, G = "sha256:ffff", "sha256:gggg"
P1, W1, W2 = b"p:p1", b"w:p1.0", b"w:p1.1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def rec(n: int, digest: str = F, timeout_s: float | None = None) -> list:
    return m.task_record(tid(n), digest, b"\x01\x90", timeout_s, "auto")


def result(n: int, state: str = "succeeded") -> list:
    return m.result_record(tid(n), state, b"\x01\x00", None, [100.0, 100.001])


def kinds(instructions: list) -> list[str]:
    return [type(i).__name__ for i in instructions]


def fresh() -> Scheduler:
    return Scheduler(clock=None, wall_clock=None, min_prefetch=1)


def test_events_in_instructions_out_with_time_from_the_events():
    s = fresh()
    out = s.handle(
        ev.PoolJoined(1.0, P1, "p1", "default/0", {}),
        ev.WorkerJoined(1.0, W1, "p1.0", "p1"),
        ev.TasksArrived(2.0, [rec(1), rec(2, timeout_s=1.0)]),
    )
    assert kinds(out) == ["RequestCode"] and out[0].digests == [F]
    out = s.handle(ev.CodeArrived(3.0, {F: b"\x10f"}))
    (send,) = out
    assert isinstance(send, ev.SendToWorker) and send.identity == W1
    assert [r[m.T_ID] for r in send.message.tasks] == [tid(1), tid(2)] and send.message.code == {F: b"\x10f"}
    assert s.workers[W1].head_since == 3.0  # the event's time, not a clock read
    out = s.handle(ev.PoolHeartbeat(4.0, P1, "p1"), ev.WorkerResults(4.0, W1, [result(1)]))
    assert kinds(out) == ["SendToWorker", "SendResults"]
    assert out[0].identity == P1 and isinstance(out[0].message, m.Heartbeat)
    assert [r[m.R_ID] for r in out[1].results] == [tid(1)]
    # task 2 (limit 1 s) is the head since 4.0; a tick well past it asks the pool to kill the worker
    out = s.handle(ev.Tick(4.5, 5000.0))
    assert kinds(out) == ["SendStates"] and out[0].updates == [[tid(2), "running", 5000.0]]
    out = s.handle(ev.Tick(9.0, 5001.0))
    assert kinds(out) == ["KillWorker"] and out[0].pool_identity == P1 and out[0].worker_id == "p1.0"
    out = s.handle(ev.CancelRequested(9.0, [tid(2), tid(99)]))
    assert kinds(out) == ["RefuseCancel"] and out[0].task_ids == [tid(2), tid(99)]
    out = s.handle(ev.Tick(30.0, 5002.0))  # no heartbeat for 26 s: the pool is dropped
    assert [i.pool_id for i in out if isinstance(i, ev.PoolDropped)] == ["p1"]


def test_apply_changes_state_at_once_and_its_outputs_leave_with_the_next_handle():
    s = fresh()
    s.handle(ev.CodeFound(0.0, {F: b"\x10f"}), ev.TasksArrived(0.0, [rec(1)]))
    s.apply(ev.PoolRefused(1.0, "default", ["lost", "no blocks start"]))
    assert s.refused_pools == {"default": ["lost", "no blocks start"]}
    (sent,) = s.handle()
    assert isinstance(sent, ev.SendResults) and sent.results[0][m.R_ERROR][:2] == ["lost", "no blocks start"]


def test_a_logged_run_replays_into_the_same_state(tmp_path):
    path = tmp_path / "scheduler.events"
    s = fresh()
    s.event_log = EventLog(path)
    s.handle(
        ev.PoolJoined(1.0, P1, "p1", "default/0", {}),
        ev.WorkerJoined(1.0, W1, "p1.0", "p1"),
        ev.WorkerJoined(1.0, W2, "p1.1", "p1"),
    )
    s.handle(ev.TasksArrived(2.0, [rec(n, F if n % 2 else G) for n in range(1, 21)]))
    s.handle(ev.CodeArrived(2.5, {F: b"\x10f"}))
    s.handle(ev.TasksArrived(2.6, [rec(21, G)]))
    s.handle(ev.CodeArrived(2.7, {G: b"\x10g"}))
    s.handle(ev.WorkerResults(3.0, W1, [result(1), result(3)]), ev.WorkerDied(3.1, "p1.1", "killed"))
    s.apply(ev.PoolLost(3.5, "p1", "block ended"))
    s.handle(ev.Tick(4.0, 5000.0), ev.CancelRequested(4.0, [tid(5)]))
    s.event_log.close()

    r = replay(path, min_prefetch=1)
    assert r is not s
    assert list(r.tasks) == list(s.tasks) and r.tasks  # the same tasks held, in the same order
    assert {k: (t.worker, t.retries, t.pool) for k, t in r.tasks.items()} == {
        k: (t.worker, t.retries, t.pool) for k, t in s.tasks.items()
    }
    assert list(r.queue) == list(s.queue)
    assert r.counters == s.counters and r.snapshot() == s.snapshot()
    assert r.waiting_code == s.waiting_code and list(r.code_asked) == list(s.code_asked)


def test_image_unavailable_fails_that_servables_tasks_with_the_reason_and_spares_the_rest():
    pkg = "ab" * 32
    run, verify = m.RUN_PREFIX + pkg, m.VERIFY_PREFIX + pkg
    s = fresh()
    out = s.handle(
        ev.PoolJoined(1.0, P1, "p1", "default/0", {}),
        ev.WorkerJoined(1.0, W1, "p1.0", "p1"),
        ev.TasksArrived(2.0, [rec(1, verify), rec(2, F)]),
    )
    assert kinds(out) == ["RequestCode"] and sorted(out[0].digests) == sorted([verify, F])
    # the daemon read the package: its container cannot be provided; it says so before the code
    out = s.handle(
        ev.ImageUnavailable(3.0, pkg, "no image site:x"), ev.CodeArrived(3.0, {verify: b"\x20", F: b"\x10f"})
    )
    results = [r for i in out if isinstance(i, ev.SendResults) for r in i.results]
    assert [(r[m.R_ID], r[m.R_STATE]) for r in results] == [(tid(1), "failed")]
    assert results[0][m.R_ERROR][:2] == ["image", "no image site:x"]
    sent = [r[m.T_ID] for i in out if isinstance(i, ev.SendToWorker) for r in i.message.tasks]
    assert sent == [tid(2)]  # the bare task runs as before
    # a later call of the same servable fails at arrival; never reaches a worker
    out = s.handle(ev.TasksArrived(4.0, [rec(3, run)]))
    results = [r for i in out if isinstance(i, ev.SendResults) for r in i.results]
    assert [(r[m.R_ID], r[m.R_STATE]) for r in results] == [(tid(3), "failed")]
    assert not [i for i in out if isinstance(i, ev.SendToWorker)]
