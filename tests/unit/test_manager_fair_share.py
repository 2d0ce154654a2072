"""Fair share of an endpoint at the manager (``manager/fair_share.py``): a user's tasks in flight
on an endpoint are bounded (the rest wait at the manager, queued, and go oldest first as results
free places); while another user submits there too, the heavy user's tasks go at a rate sized by
the manager loop's load, and a light user's call is never held. The Router is driven directly
with its own clock, writing to a real TaskStore on SQLite."""

from __future__ import annotations

import pytest

from dlhub.manager import events as ev
from dlhub.manager import fair_share
from dlhub.manager.routing import Router
from dlhub.manager.store import TaskStore, make_engine, migrate
from dlhub.protocol import messages as m

ALICE, BOB = b"c:alice", b"c:bob"
EP = b"e:ep:s1"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def tasks(first: int, last: int) -> list[list]:
    return [m.task_record(tid(n), "sha256:f", b"\x01\x90", None, "auto") for n in range(first, last + 1)]


def hello() -> m.Hello:
    return m.Hello("endpoint", "ep", "tok", "s1", {"python": "3.11.7", "dill": "0.4"}, {"pid": 1})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'fs.db'}")
    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None)
    store.start()
    clock = Clock()
    router = Router(store, clock=clock, known_endpoints=["ep"], max_inflight_per_user=5)
    router.endpoint_hello(EP, hello())
    router.drain()
    try:
        yield router, store, clock
    finally:
        store.close()


def sent(router: Router) -> list[int]:
    """Task numbers sent to the endpoint since the last drain, in order."""
    out = []
    for link, _, msg in router.drain():
        if link == "endpoint" and isinstance(msg, m.Tasks):
            out += [int.from_bytes(r[m.T_ID], "big") for r in msg.tasks]
    return out


def finish(router: Router, *numbers: int) -> None:
    router.endpoint_results(EP, [m.result_record(tid(n), "succeeded", b"ok") for n in numbers])


def submit(router: Router, client: bytes, user: str, first: int, last: int) -> None:
    router.submit(client, user, "s", m.Submit("ep", tasks(first, last)))


def test_a_user_has_at_most_max_inflight_on_an_endpoint_and_the_rest_go_oldest_first(env):
    router, store, _ = env
    submit(router, ALICE, "alice", 1, 12)
    assert sent(router) == [1, 2, 3, 4, 5]
    status = router.status()["endpoints"]["ep"]
    assert (status["inflight"], status["held"]) == (5, 7)
    # what waits here is stored as queued, not dispatched (Query and a restart read it so)
    store.flush()
    rows = store.read([tid(5), tid(6)], [])
    assert (rows[tid(5)]["state"], rows[tid(6)]["state"]) == ("dispatched", "queued")
    assert rows[tid(6)]["t_dispatched"] is None
    # a later submission waits behind her held tasks, in order
    submit(router, ALICE, "alice", 13, 13)
    assert sent(router) == []
    finish(router, 2, 4, 5)
    assert sent(router) == [6, 7, 8]
    finish(router, 1, 3, 6, 7, 8)
    assert sent(router) == [9, 10, 11, 12, 13]
    store.flush()
    assert store.read([tid(9)], [])[tid(9)]["state"] == "dispatched"
    assert router.status()["endpoints"]["ep"]["held"] == 0


def test_a_held_task_can_be_cancelled_and_is_never_sent(env):
    router, _, _ = env
    submit(router, ALICE, "alice", 1, 7)
    assert sent(router) == [1, 2, 3, 4, 5]
    router.cancel(ALICE, [tid(6)], "alice")
    results = [r for link, _, msg in router.drain() if isinstance(msg, m.Results) for r in msg.results]
    assert [(r[m.R_ID], r[m.R_STATE]) for r in results] == [(tid(6), "cancelled")]
    finish(router, 1, 2)
    assert sent(router) == [7]


def test_held_tasks_wait_while_the_endpoint_is_away_and_go_when_it_is_back(env):
    router, _, _ = env
    submit(router, ALICE, "alice", 1, 8)
    assert sent(router) == [1, 2, 3, 4, 5]
    router.endpoint_gone(EP)
    submit(router, ALICE, "alice", 9, 9)  # offline: waits in the endpoint's pending queue
    finish(router, 1, 2, 3)
    assert sent(router) == []  # results of a gone endpoint free places, but nothing goes to it
    router.endpoint_hello(EP, hello())
    # 4 and 5 are re-sent (the endpoint does not say it holds them); then her oldest held ones
    assert sent(router) == [4, 5, 6, 7, 8]
    finish(router, 4, 5, 6)
    assert sent(router) == [9]


def test_an_endpoint_with_many_workers_gets_twice_its_workers_per_user(env):
    router, _, _ = env
    router.endpoint_heartbeat(EP, {"workers": 8})
    submit(router, ALICE, "alice", 1, 20)
    assert len(sent(router)) == 16


def test_while_users_compete_a_light_users_call_goes_at_once_and_the_heavy_user_is_paced(env):
    router, _, clock = env
    router.max_inflight_per_user = 1000
    submit(router, ALICE, "alice", 1, 100)
    assert len(sent(router)) == 100  # alone: only the cap applies
    clock.now += 0.5
    submit(router, BOB, "bob", 1001, 1001)
    assert sent(router) == [1001]  # bob: light, never held
    # alice's next tasks wait: she already has more than the window in flight
    clock.now += 0.01
    submit(router, ALICE, "alice", 101, 400)
    assert sent(router) == []
    # the manager's loop is busy: the window and the rate shrink
    for _ in range(10):
        router.handle(ev.LoopLoad(0.95, clock.now))
    assert router.share.size == fair_share.WINDOW_MIN
    assert router.share.rate == fair_share.RATE_MIN
    router.drain()
    finish(router, *range(1, 101))
    clock.now += 0.05
    released = sent(router)
    assert 0 < len(released) <= fair_share.WINDOW_MIN  # at the window's rate, oldest first
    assert released == list(range(101, 101 + len(released)))
    # bob still goes at once, whatever alice's tokens
    submit(router, BOB, "bob", 1002, 1002)
    assert 1002 in sent(router)
    # bob stops: after CONTENTION_S alice is alone again, and only the cap applies
    clock.now += fair_share.CONTENTION_S + 0.1
    router.handle(ev.LoopLoad(0.95, clock.now))
    assert router.share.size == fair_share.WINDOW_START
    finish(router, *released, 1001, 1002)
    assert sorted(sent(router)) == list(range(101 + len(released), 401))
    assert router.status()["endpoints"]["ep"]["held"] == 0


def test_an_idle_loop_lets_the_heavy_users_rate_grow_again(env):
    router, _, clock = env
    router.share.sample(0.9, contended=True)
    low = router.share.rate
    for _ in range(5):
        assert router.share.sample(0.1, contended=True)
    assert router.share.rate > low * 2
    assert router.share.size > fair_share.WINDOW_MIN


def test_the_token_bucket_refills_at_the_rate_and_keeps_only_a_short_burst():
    window = fair_share.ShareWindow()
    window.rate = 1000.0
    assert window.take(100, 10.0) == 5  # a first call: a full burst (5 ms of the rate)
    assert window.take(100, 10.0) == 0
    assert window.take(100, 10.002) == 2
    assert window.take(100, 20.0) == 5  # ten idle seconds still give one burst, not 10,000


def test_the_manager_config_checks_max_inflight_per_user():
    from dlhub.manager.config import ManagerConfig

    assert ManagerConfig(home="/tmp/unused").max_inflight_per_user == fair_share.MAX_INFLIGHT_PER_USER
    with pytest.raises(ValueError, match="max_inflight_per_user must be a positive integer, got 0"):
        ManagerConfig(home="/tmp/unused", max_inflight_per_user=0)


def check_books(router: Router) -> None:
    """Every open task is in exactly one place of its endpoint (pending, held or in flight), and
    the per-user in-flight counts are those of the in-flight map."""
    ep = router.endpoints["ep"]
    held = {t for queue in ep.held.values() for t in queue}
    for task_id, entry in router.tasks.items():
        places = (task_id in ep.pending) + (task_id in held) + (task_id in ep.inflight)
        assert places == 1, (task_id.hex(), entry.state, places)
        # waiting here (held, or pending while the endpoint was away) is what "queued" means
        assert (entry.state == "queued") == (task_id in held or task_id in ep.pending), entry.state
    counts: dict[str, int] = {}
    for task_id in ep.inflight:
        if task_id in router.tasks:
            owner = router.tasks[task_id].owner
            counts[owner] = counts.get(owner, 0) + 1
    assert {u: n for u, n in ep.inflight_by_user.items() if n} == counts
    assert all(held_ids for held_ids in ep.held.values())  # no empty queues left behind


@pytest.mark.parametrize("seed", range(6))
def test_random_submits_results_cancels_and_reconnects_keep_the_books(env, seed):
    """Random steps of two users on one endpoint: every task ends once, none is sent while held,
    and the accounting (pending / held / in flight, per-user counts) stays exact."""
    import random

    router, _, clock = env
    rng = random.Random(seed)
    clients = {"alice": ALICE, "bob": BOB}
    next_id, sent_ids, ended = 1, [], set()
    for _ in range(400):
        step = rng.random()
        clock.now += rng.choice((0.0, 0.001, 0.3))
        if step < 0.3:
            user = rng.choice(("alice", "bob"))
            n = rng.randint(1, 12)
            submit(router, clients[user], user, next_id, next_id + n - 1)
            next_id += n
        elif step < 0.55:
            inflight = list(router.endpoints["ep"].inflight)
            if inflight and router.endpoints["ep"].connected:
                done = rng.sample(inflight, min(len(inflight), rng.randint(1, 5)))
                router.endpoint_results(EP, [m.result_record(t, "succeeded", b"ok") for t in done])
        elif step < 0.65:
            open_ids = list(router.tasks)
            if open_ids:
                task_id = rng.choice(open_ids)
                router.cancel(clients[router.tasks[task_id].owner], [task_id], router.tasks[task_id].owner)
        elif step < 0.72:
            router.endpoint_gone(EP)
        elif step < 0.8:
            router.endpoint_hello(EP, hello())
        else:
            router.handle(ev.LoopLoad(rng.random(), clock.now))
            router._now = None  # back to the test's clock for the calls that follow
        for link, _, msg in router.drain():
            if link == "endpoint" and isinstance(msg, m.Tasks):
                for rec in msg.tasks:
                    assert rec[m.T_ID] in router.tasks, "a task that ended was sent"
                    sent_ids.append(rec[m.T_ID])
            elif link == "client" and isinstance(msg, m.Results):
                for res in msg.results:
                    assert res[m.R_ID] not in ended, "a task ended twice"
                    ended.add(res[m.R_ID])
        check_books(router)
    # the endpoint comes back, answers everything, and no task is left behind
    router.endpoint_hello(EP, hello())
    router.max_inflight_per_user = 10**6
    clock.now += 5
    for _ in range(100):
        router.drain()
        inflight = list(router.endpoints["ep"].inflight)
        if not router.tasks:
            break
        router.endpoint_results(EP, [m.result_record(t, "succeeded", b"ok") for t in inflight])
        clock.now += 0.01
    assert not router.tasks


def test_dlhub_status_counts_held_tasks_as_waiting_at_the_manager(env):
    from dlhub.executor.status_view import _endpoint_rows

    router, _, _ = env
    submit(router, ALICE, "alice", 1, 12)
    ep = router.status()["endpoints"]["ep"]
    rows = dict(_endpoint_rows(ep, {"workers": 2, "queued": 0, "on_workers": 5}))
    assert rows["tasks"] == (
        "7 waiting at the manager, 5 sent to the endpoint (no result yet); "
        "7 of those waiting are held for their user's fair share"
    )
