"""The endpoint log's account of tasks: failures rate-limited per kind with a suppression line,
summaries when work stops, and a log file that stays bounded even with no backups."""

from __future__ import annotations

import logging

from dlhub.endpoint.lifecycle import setup_logging
from dlhub.endpoint.scheduler import Scheduler
from dlhub.endpoint.tasklog import TaskLog, describe_function, failure_kind
from dlhub.protocol import errors
from dlhub.protocol.serialize import serialize_function


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


def make_log(clock: Clock) -> tuple[TaskLog, Lines]:
    logger = logging.getLogger(f"test-tasklog-{id(clock)}")
    logger.propagate = False
    handler = Lines()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    tasklog = TaskLog(logger, lambda f: f"function {f}", per_kind=3, max_lines=20, window_s=10, clock=clock)
    return tasklog, handler


def user_error(kind: str, message: str) -> list:
    return ["remote", f"{kind}: {message}\nmore lines", "Traceback ...", None]


def test_failure_kind_is_the_exception_type_or_the_error_code():
    assert failure_kind(user_error("ValueError", "bad")) == "ValueError"
    assert failure_kind(["remote", "mymod.MyError: x", "", None]) == "mymod.MyError"
    assert failure_kind(errors.infra_error("worker-lost", "worker w1 died running the task: killed")) == (
        "worker-lost"
    )


def test_failures_are_logged_up_to_the_limit_per_kind_then_summed_up():
    clock = Clock()
    tasklog, out = make_log(clock)
    batch = [(bytes([i]) * 16, "f1", b"w:pool.0.1", user_error("ValueError", f"bad {i}")) for i in range(50)]
    batch += [(bytes([i]) * 16, "f1", None, user_error("KeyError", str(i))) for i in range(2)]
    tasklog.failures(batch)
    warnings = [text for level, text in out.lines if level == "WARNING"]
    assert len(warnings) == 3 + 2  # three ValueErrors, both KeyErrors
    first = warnings[0]
    assert first.startswith(f"task {(bytes([0]) * 16).hex()} failed: ValueError: bad 0 (")
    assert "function f1" in first and "worker pool.0.1" in first and "more lines" not in first
    assert "worker none" in warnings[-1]

    clock.now += 11  # the window ends: one line for what was not written
    tasklog.tick(52, 52, idle=False, state="busy")
    suppressed = [text for _, text in out.lines if text.startswith("suppressed")]
    assert suppressed == [
        "suppressed 47 similar failures (ValueError) in the last 11 s; "
        "at most 3 per kind and 20 in all are logged every 10 s"
    ]
    tasklog.failures([(b"x" * 16, "f1", None, user_error("ValueError", "again"))])  # a new window
    assert out.lines[-1][1].startswith(f"task {(b'x' * 16).hex()} failed: ValueError: again")


def test_many_kinds_of_failure_are_capped_in_all_and_summed_up_in_few_lines():
    clock = Clock()
    tasklog, out = make_log(clock)
    tasklog.failures([(b"t" * 16, "f", None, user_error(f"Kind{i % 40}Error", "x")) for i in range(400)])
    assert len(out.lines) == 20  # max_lines in all, though 40 kinds could each have 3
    clock.now += 10
    tasklog.tick(400, 400, idle=False, state="busy")
    flushed = [text for _, text in out.lines[20:]]
    assert len(flushed) == 11  # the ten most frequent kinds, then one line for the rest
    assert flushed[-1].startswith("suppressed 280 failures of 30 other kinds in the last 10 s")
    assert sum(int(t.split()[1]) for t in flushed) == 400 - 20


def test_a_summary_is_written_when_work_stops_and_then_every_interval_while_it_runs():
    clock = Clock()
    tasklog, out = make_log(clock)
    tasklog.summary_s = 60
    clock.now += 5
    tasklog.tick(0, 0, idle=True, state="idle")
    assert out.lines == []  # nothing ran: nothing to say
    clock.now += 3
    tasklog.tick(100, 0, idle=False, state="now 5 queued")
    assert out.lines == []  # still running, interval not over
    tasklog.failures([(b"t" * 16, "f", None, user_error("ValueError", "x"))] * 4)
    tasklog.failures([(b"t" * 16, "f", None, errors.infra_error("worker-lost", "died"))])
    clock.now += 2
    tasklog.tick(6000, 5, idle=True, state="now 0 queued")  # idle, 10 s after the last summary
    assert out.lines[-1] == (
        "INFO",
        "tasks in the last 5 s: 6000 finished, 5 failed (4 ValueError, 1 worker-lost); now 0 queued",
    )
    clock.now += 3
    tasklog.tick(6001, 5, idle=True, state="now 0 queued")
    assert out.lines[-1][1].startswith("tasks in the last 5 s: 6000")  # idle again: not yet
    clock.now += 58
    tasklog.tick(6010, 5, idle=False, state="busy")
    assert out.lines[-1] == ("INFO", "tasks in the last 61 s: 10 finished, 0 failed; busy")
    tasklog.failures([(b"t" * 16, "f", None, user_error("ValueError", "x"))] * 4)  # one suppressed
    clock.now += 1
    tasklog.tick(6014, 9, idle=True, state="stopping", final=True)  # the endpoint stops: say it all
    assert [text for _, text in out.lines[-2:]] == [
        "suppressed 1 similar failures (ValueError) in the last 1 s; "
        "at most 3 per kind and 20 in all are logged every 10 s",
        "tasks in the last 1 s: 4 finished, 4 failed (4 ValueError); stopping",
    ]


def test_the_scheduler_collects_failures_only_when_asked_and_counts_them():
    s = Scheduler()
    s.add_tasks([[b"b" * 16, "sha256:ab", b"", None, "dill", {"gpus": 99}, None]])
    assert s.failures is None and s.counters["failed"] == 1  # no pool offers 99 GPUs
    s.failures = []
    s.add_tasks([[b"c" * 16, "sha256:ab", b"", None, "dill", {"gpus": 99}, None]])
    assert [(f[0], f[1], f[2], f[3][0]) for f in s.failures] == [(b"c" * 16, "sha256:ab", None, "resources")]
    assert s.counters["failed"] == 2


def test_functions_are_described_by_name_and_servables_by_label():
    def my_function(x):
        return x

    blob = serialize_function(my_function)
    assert describe_function("sha256:0123456789abcdef", {}, {"sha256:0123456789abcdef": blob}) == (
        "function my_function 0123456789ab"
    )
    assert describe_function("servable:sha256:99", {"servable:sha256:99": "admin/noop:1"}, {}) == (
        "servable admin/noop:1"
    )
    assert describe_function("sha256:77", {}, {}) == "function sha256:77"


def test_the_log_stays_bounded_with_no_backups(tmp_path):
    path = tmp_path / "endpoint.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(path, max_bytes=2000, backups=0)
        for i in range(500):
            logging.getLogger("dlhub.endpoint").warning("line %d %s", i, "x" * 50)
        assert path.stat().st_size <= 2000
        assert "line 499" in path.read_text()
        assert list(tmp_path.iterdir()) == [path]
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
