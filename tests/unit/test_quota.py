"""Per-user quota at the manager: a task over its submitter's open-task limit fails at once with
QuotaExceeded (stored as failed, never forwarded), and the limit frees up as tasks finish. The
Router is driven directly, writing to a real TaskStore on SQLite."""

from __future__ import annotations

import pytest

from dlhub.manager.routing import Router
from dlhub.manager.store import TaskStore, make_engine, migrate, unpack_error
from dlhub.protocol import errors
from dlhub.protocol import messages as m

ALICE, BOB, ADMIN = b"c:alice", b"c:bob", b"c:admin"
EP = b"e:ep:s1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def tasks(first: int, last: int) -> list[list]:
    return [m.task_record(tid(n), "sha256:f", b"\x01\x90", None, "auto") for n in range(first, last + 1)]


@pytest.fixture
def env(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None)
    store.start()
    router = Router(
        store,
        clock=lambda: 1000.0,
        known_endpoints=["ep"],
        principal=lambda user: (user == "root", frozenset()),
        max_open_tasks_per_user=3,
    )
    router.endpoint_hello(
        EP, m.Hello("endpoint", "ep", "tok", "s1", {"python": "3.11.7", "dill": "0.4"}, {"pid": 1})
    )
    router.drain()
    try:
        yield router, store
    finally:
        store.close()


def outcome(router: Router) -> tuple[dict[bytes, list], list[bytes]]:
    """(results to clients by task id, task ids sent to the endpoint) since the last drain."""
    results, forwarded = {}, []
    for link, _, msg in router.drain():
        if link == "client" and isinstance(msg, m.Results):
            results.update({r[m.R_ID]: r for r in msg.results})
        elif link == "endpoint" and isinstance(msg, m.Tasks):
            forwarded += [r[m.T_ID] for r in msg.tasks]
    return results, forwarded


def test_a_task_over_the_quota_fails_at_once_with_the_limit_and_flag_named(env):
    router, store = env
    router.submit(ALICE, "alice", "s", m.Submit("ep", tasks(1, 5)))
    results, forwarded = outcome(router)
    assert forwarded == [tid(1), tid(2), tid(3)]
    assert sorted(results) == [tid(4), tid(5)]
    code, message, _, _ = results[tid(4)][m.R_ERROR]
    assert results[tid(4)][m.R_STATE] == "failed" and code == "quota-exceeded"
    assert message == (
        "alice already has 3 tasks open (queued or running), the most one user may have at once "
        "(max_open_tasks_per_user = 3); wait for some to finish; the limit is set by "
        "`dlhub-manager serve --max-open-tasks-per-user N`"
    )
    exc = errors.exception_from_record(results[tid(4)][m.R_ERROR])
    assert isinstance(exc, errors.QuotaExceeded)
    assert router.counters["over_quota"] == 2 and router.open_by_user == {"alice": 3}
    # stored as failed, with the reason (Query and Fetch find it)
    assert store.flush(10)
    row = store.lookup([tid(4)])[tid(4)]
    assert row["state"] == "failed" and unpack_error(row["error"])[0] == "quota-exceeded"

    # bob's quota is his own; an admin has none
    router.submit(BOB, "bob", "s", m.Submit("ep", tasks(10, 12)))
    router.submit(ADMIN, "root", "s", m.Submit("ep", tasks(20, 29)))
    results, forwarded = outcome(router)
    assert results == {} and len(forwarded) == 13

    # a finished task frees a place
    router.endpoint_results(EP, [m.result_record(tid(1), "succeeded", b"\x01\x00", None, [1.0, 1.0])])
    outcome(router)
    assert router.open_by_user["alice"] == 2
    router.submit(ALICE, "alice", "s", m.Submit("ep", tasks(6, 7)))
    results, forwarded = outcome(router)
    assert forwarded == [tid(6)] and list(results) == [tid(7)]
    for n in (2, 3, 6):
        router.endpoint_results(
            EP, [m.result_record(tid(n), "failed", None, ["remote", "x", "", None], None)]
        )
    outcome(router)
    assert "alice" not in router.open_by_user  # nothing kept for users with nothing open


def test_the_default_quota_is_generous():
    from dlhub.manager import ManagerConfig

    assert Router(None).max_open_tasks_per_user == 1_000_000
    with pytest.raises(ValueError, match="max_open_tasks_per_user must be a positive integer, got 0"):
        ManagerConfig(home="/tmp/unused", max_open_tasks_per_user=0)
