"""One event log for both loops (issue 11, item 5): :mod:`dlhub.protocol.eventlog` frames and reads
records; the Router logs one event a record, the Scheduler one ``(method, events)`` call a record,
and each side's reader (``manager.events.read_events``, ``endpoint.events.read_log``) reads its own
through it."""

from __future__ import annotations

import os
import stat

from dlhub.endpoint import events as sev
from dlhub.manager import events as rev
from dlhub.protocol import eventlog
from dlhub.protocol import messages as m


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def test_records_come_back_in_order_and_the_file_is_private(tmp_path):
    path = tmp_path / "events.log"
    with eventlog.EventLog(path) as log:
        for n in range(5):
            log.append({"n": n, "blob": bytes([n]) * n})
    assert log.closed
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with eventlog.EventLog(path) as log:  # appends, never truncates
        log.append("sixth")
    assert list(eventlog.read_log(path)) == [{"n": n, "blob": bytes([n]) * n} for n in range(5)] + ["sixth"]


def test_a_log_cut_anywhere_ends_at_its_last_whole_record(tmp_path):
    path = tmp_path / "whole.log"
    records = [
        ("handle", (sev.TasksArrived(float(n), [m.task_record(tid(n), "sha256:f", b"x", None)]),))
        for n in range(4)
    ]
    ends = []
    with eventlog.EventLog(path) as log:
        for record in records:
            log.append(record)
            ends.append(os.path.getsize(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.log"
    for size in range(len(data) + 1):  # a writer that died after any byte
        cut.write_bytes(data[:size])
        whole = sum(1 for end in ends if end <= size)
        assert list(eventlog.read_log(cut)) == records[:whole], size


def test_both_loops_write_through_the_shared_log_and_read_their_own_format(tmp_path):
    assert issubclass(rev.EventLog, eventlog.EventLog) and issubclass(sev.EventLog, eventlog.EventLog)

    router_path = tmp_path / "router.log"
    called = []
    submitted = rev.ClientSubmitted(b"", "alice", "s", m.Submit("ep", []), 1.0, callback=called.append)
    with rev.EventLog(router_path) as log:
        log.write(submitted)
        log.write(rev.Tick(2.0))
    assert stat.S_IMODE(os.stat(router_path).st_mode) == 0o600
    back = list(rev.read_events(router_path))
    assert back == [submitted, rev.Tick(2.0)] and back[0].callback is None  # callbacks are left out
    assert list(eventlog.read_log(router_path)) == back  # one event a record

    scheduler_path = tmp_path / "scheduler.log"
    calls = [("handle", (sev.Tick(1.0, 100.0),)), ("apply", (sev.Paused(2.0),))]
    with sev.EventLog(scheduler_path) as log:
        for method, events in calls:
            log.write(method, events)
    assert list(sev.read_log(scheduler_path)) == calls == list(eventlog.read_log(scheduler_path))


def test_a_large_payload_held_as_a_frame_view_is_logged_as_its_bytes(tmp_path):
    """Payloads of 64 KiB or more arrive as memoryviews of ZeroMQ frames (pickle refuses those):
    the log holds their bytes, so a replay sees the same values."""
    payload = bytes(range(256)) * 512
    res = m.result_record(b"\x01" * 16, "succeeded", memoryview(payload))
    event = rev.EndpointResultsArrived(b"ep", [res], 1.0, frozenset({b"\x01" * 16}))
    path = tmp_path / "big.log"
    with eventlog.EventLog(path) as log:
        log.append(event)
    (back,) = list(eventlog.read_log(path))
    assert back.results[0][m.R_PAYLOAD] == payload and type(back.results[0][m.R_PAYLOAD]) is bytes
    assert back.uncacheable == frozenset({b"\x01" * 16})
