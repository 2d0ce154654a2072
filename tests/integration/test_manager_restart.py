"""A restarted manager knows the endpoints its tasks went to before they re-register: calls and
publishes for them wait for the endpoint instead of failing as "unknown endpoint"."""

from __future__ import annotations

import os
import time

from dlhub.manager import Manager, ManagerConfig
from dlhub.manager import events as ev
from dlhub.protocol import messages as m


def test_a_restarted_manager_knows_earlier_endpoints_and_queues_for_them(tmp_path):
    config = ManagerConfig(home=tmp_path / "manager", rest_port=None)
    first = Manager(config)
    first.start()
    try:  # endpoint "ep-x" registers, gets a task recorded for it, and goes away
        hello = m.Hello("endpoint", "ep-x", "tok", "s1", {}, {})
        first.route(ev.EndpointRegistered(b"e:ep-x:s1", hello, "admin", time.time()))
        first.route(ev.EndpointLeft(b"e:ep-x:s1"))
        task = m.task_record(os.urandom(m.TASK_ID_BYTES), "sha256:" + "0" * 64, b"\x01\x90")
        first.route(ev.ClientSubmitted(b"c", "admin", "s", m.Submit("ep-x", [task]), time.time()))
        # make it terminal so the restart has nothing to re-queue: only the name is remembered
        first.route(ev.ClientCancelled(b"c", [task[m.T_ID]], None))
        assert first.store.flush()
    finally:
        first._shutdown()

    second = Manager(config)
    second.start()
    try:
        assert "ep-x" in second.router.endpoints
        assert not second.router.endpoints["ep-x"].connected
        later = m.task_record(os.urandom(m.TASK_ID_BYTES), "sha256:" + "0" * 64, b"\x01\x90")
        out = second.router.handle(
            ev.ClientSubmitted(b"c", "admin", "s", m.Submit("ep-x", [later]), time.time()), ev.Flush()
        )
        sent = [i.msg for i in out if isinstance(i, ev.Send)]
        assert not [msg for msg in sent if isinstance(msg, m.Results)]  # not failed: it waits
        assert second.router.tasks[later[m.T_ID]].state == "queued"
        assert list(second.router.endpoints["ep-x"].pending) == [later[m.T_ID]]
        assert second.servables.default_endpoint(None) == "ep-x"  # the only one it knows
    finally:
        second._shutdown()
        time.sleep(0.05)
