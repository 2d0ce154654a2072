"""An endpoint's reconnect resends only what it does not hold (issue 10, items 7 and 9).

After its connection drops, an endpoint says Hello again. Its Hello lists the task ids it holds
(queued, running, or finished with the result unacknowledged), and the manager resends only the
tasks in flight there that are not among them: not a burst of every task in flight, and no task
lost (each one runs exactly once).

A manager in this process, an endpoint process with one worker; the endpoint's TCP connection
is cut from the manager's side (``shutdown`` of its descriptor), as a network cut would.
"""

from __future__ import annotations

import logging
import os
import socket

from conftest import start_custom_stack, stop_custom_stack, wait_until

N_TASKS = 300


def record_run(path, i):
    import os
    import time

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    time.sleep(0.01)
    return i


def _endpoint_fd(mgr, name: str) -> int | None:
    ep = mgr.router.endpoints.get(name)
    identity = ep.identity if ep is not None else None
    return mgr.endpoint_conns.bound.get(identity) if identity is not None else None


def _registrations(caplog) -> int:
    return sum("registered (session" in r.getMessage() for r in caplog.records)


def test_reconnect_resends_only_tasks_the_endpoint_does_not_hold(tmp_path_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlhub.manager")
    cs = start_custom_stack(tmp_path_factory.mktemp("dlhub-reconnect"), workers=1)
    try:
        mgr, runs = cs.manager, tmp_path / "runs.txt"
        ex = cs.executor()
        futures = [ex.submit(record_run, str(runs), i) for i in range(N_TASKS)]
        wait_until(lambda: runs.exists() and len(runs.read_text().split()) >= 20, 30, what="tasks running")
        in_flight = len(mgr.router.endpoints[cs.endpoint_name].inflight)
        assert in_flight > 100, in_flight  # most still wait at the endpoint
        before, hellos = mgr.router.counters["resent"], _registrations(caplog)

        fd = _endpoint_fd(mgr, cs.endpoint_name)
        assert fd is not None
        with socket.socket(fileno=os.dup(fd)) as dup:  # the connection ends; the endpoint redials
            dup.shutdown(socket.SHUT_RDWR)
        wait_until(
            lambda: _registrations(caplog) > hellos,
            30,
            what="the endpoint to say Hello again on a new connection",
        )

        assert sorted(f.result(timeout=120) for f in futures) == list(range(N_TASKS))
        ran = [int(x) for x in runs.read_text().split()]
        assert sorted(ran) == list(range(N_TASKS)), "a task ran twice or never"
        resent = mgr.router.counters["resent"] - before
        # only tasks lost with the dropped connection go again, not all that were in flight
        assert resent < in_flight // 4, f"resent {resent} of {in_flight} in flight"
    finally:
        stop_custom_stack(cs)
