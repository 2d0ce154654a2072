"""Images per servable in the Scheduler: a servable's calls run only on workers inside its image;
workers are started in an image on demand (``StartWorker`` to the pool, replacing an idle worker),
stay warm there, and the least recently used image's idle worker is the one replaced."""

from __future__ import annotations

from dlhub.endpoint import events as ev
from dlhub.endpoint.scheduler import Scheduler
from dlhub.protocol import messages as m

P1 = b"p:p1"
PKG = {"a": "a" * 64, "b": "b" * 64, "c": "c" * 64}
IMG = {"a": "/img/a", "b": "/img/b", "c": "docker://c:1"}


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def call(n: int, servable: str | None) -> list:
    function = m.RUN_PREFIX + PKG[servable] if servable else "sha256:bare"
    return m.task_record(tid(n), function, b"\x01\x90", None, "auto")


def done(n: int) -> list:
    return m.result_record(tid(n), "succeeded", b"\x01\x00", None, [1.0, 1.001])


def sent(out: list) -> dict[bytes, list]:
    """Worker identity -> task ids sent to it."""
    return {
        i.identity: [r[m.T_ID] for r in i.message.tasks]
        for i in out
        if isinstance(i, ev.SendToWorker) and isinstance(i.message, m.Tasks)
    }


def starts(out: list) -> list[tuple[str, str | None]]:
    return [
        (i.message.worker_id, i.message.image)
        for i in out
        if isinstance(i, ev.SendToWorker) and isinstance(i.message, m.StartWorker)
    ]


def code() -> dict[str, bytes]:
    blobs = {m.RUN_PREFIX + p: b"\x10pkg" for p in PKG.values()}
    return {**blobs, "sha256:bare": b"\x10f"}


def test_calls_run_only_inside_their_image_and_the_lru_image_makes_room():
    s = Scheduler(clock=None, wall_clock=None, min_prefetch=0)
    s.handle(
        ev.PoolJoined(0.0, P1, "p1", "default/0", {}),
        ev.WorkerJoined(0.0, b"w:p1.0", "p1.0", "p1"),
        ev.WorkerJoined(0.0, b"w:p1.1", "p1.1", "p1"),
        *(ev.ServableImage(0.0, PKG[k], IMG[k]) for k in PKG),
        ev.CodeFound(0.0, code()),
    )
    # a bare call runs on a worker of the pool's own image
    assert sent(s.handle(ev.TasksArrived(1.0, [call(1, None)]))) == {b"w:p1.0": [tid(1)]}
    # a call for image a: no worker there, so the idle worker of the pool's image is replaced
    out = s.handle(ev.TasksArrived(2.0, [call(2, "a")]))
    assert starts(out) == [("p1.1", IMG["a"])] and not sent(out)
    assert all(i.identity == P1 for i in out if isinstance(i, ev.SendToWorker))
    # asked once, not again while it starts; the replaced worker gets nothing new meanwhile
    assert starts(s.handle(ev.TasksArrived(2.5, [call(3, "a")]))) == []
    out = s.handle(
        ev.WorkerDied(3.0, "p1.1", "replaced"), ev.WorkerJoined(3.0, b"w:p1.2", "p1.2", "p1", image=IMG["a"])
    )
    assert sent(out) == {b"w:p1.2": [tid(2)]}  # one at a time (no prefetch yet)
    s.handle(ev.WorkerResults(4.0, b"w:p1.2", [done(2)]))
    s.handle(ev.WorkerResults(4.1, b"w:p1.2", [done(3)]), ev.WorkerResults(4.1, b"w:p1.0", [done(1)]))
    # warm: the next call for a goes to the worker already inside a, no start
    out = s.handle(ev.TasksArrived(5.0, [call(4, "a")]))
    assert sent(out) == {b"w:p1.2": [tid(4)]} and starts(out) == []
    s.handle(ev.WorkerResults(5.1, b"w:p1.2", [done(4)]))
    # image b: the pool's own image was used longest ago (t=1) -> its idle worker is replaced
    out = s.handle(ev.TasksArrived(6.0, [call(5, "b")]))
    assert starts(out) == [("p1.0", IMG["b"])]
    out = s.handle(
        ev.WorkerDied(6.5, "p1.0", "replaced"), ev.WorkerJoined(6.5, b"w:p1.3", "p1.3", "p1", image=IMG["b"])
    )
    assert sent(out) == {b"w:p1.3": [tid(5)]}
    s.handle(ev.WorkerResults(7.0, b"w:p1.3", [done(5)]))
    # image c: a (last used t=5) is older than b (t=6.5): a's worker makes room
    out = s.handle(ev.TasksArrived(8.0, [call(6, "c")]))
    assert starts(out) == [("p1.2", IMG["c"])]
    # a bare call now has no worker of the pool's image: b's worker is the only idle one left
    out = s.handle(ev.TasksArrived(8.5, [call(7, None)]))
    assert starts(out) == [("p1.3", None)]
    assert s.counters["image_starts"] == 4
    snap = s.snapshot()
    assert snap["image_queued"] == {IMG["c"]: 1} and snap["queued_by_pool"] == {"default": 1}


def test_a_busy_pool_waits_and_a_lost_start_is_asked_again():
    s = Scheduler(clock=None, wall_clock=None, min_prefetch=0)
    s.handle(
        ev.PoolJoined(0.0, P1, "p1", "default/0", {}),
        ev.WorkerJoined(0.0, b"w:p1.0", "p1.0", "p1"),
        ev.ServableImage(0.0, PKG["a"], IMG["a"]),
        ev.CodeFound(0.0, code()),
    )
    s.handle(ev.TasksArrived(1.0, [call(1, None)]))
    out = s.handle(ev.TasksArrived(1.0, [call(2, "a")]))
    assert starts(out) == []  # the only worker is busy: the call waits, not run outside its image
    out = s.handle(ev.WorkerResults(2.0, b"w:p1.0", [done(1)]))
    assert starts(out) == [("p1.0", IMG["a"])]
    # the worker p1.1 that came back is in the pool's own image (the start was lost): after
    # IMAGE_START_TIMEOUT_S the image is asked for again
    s.handle(ev.WorkerDied(2.5, "p1.0", "replaced"), ev.WorkerJoined(2.5, b"w:p1.1", "p1.1", "p1"))
    assert starts(s.handle(ev.Tick(3.0, 3.0))) == []
    assert starts(s.handle(ev.PoolHeartbeat(200.0, P1, "p1"), ev.Tick(200.0, 200.0))) == [("p1.1", IMG["a"])]
    # cancelled while waiting for its image: dropped from the image's queue
    s.handle(ev.CancelRequested(201.0, [tid(2)]))
    assert s.snapshot()["image_queued"] == {}


def test_an_image_being_fetched_starts_no_worker_and_a_failed_fetch_fails_its_calls():
    s = Scheduler(clock=None, wall_clock=None, min_prefetch=0)
    s.handle(
        ev.PoolJoined(0.0, P1, "p1", "default/0", {}),
        ev.WorkerJoined(0.0, b"w:p1.0", "p1.0", "p1"),
        ev.ServableImage(0.0, PKG["c"], IMG["c"], fetching=True),
        ev.ServableImage(0.0, PKG["a"], IMG["a"], fetching=True),
        ev.CodeFound(0.0, code()),
    )
    assert starts(s.handle(ev.TasksArrived(1.0, [call(1, "c"), call(2, "a")]))) == []
    assert starts(s.handle(ev.ImageFetched(2.0, IMG["a"]))) == [("p1.0", IMG["a"])]
    out = s.handle(ev.ImageFetched(3.0, IMG["c"], "image docker://c:1: pull failed: denied"))
    (res,) = [i for i in out if isinstance(i, ev.SendResults)]
    assert [(r[m.R_ID], r[m.R_STATE]) for r in res.results] == [(tid(1), "failed")]
    assert "pull failed: denied" in res.results[0][m.R_ERROR][1]
    out = s.handle(ev.TasksArrived(4.0, [call(3, "c")]))  # later calls fail at arrival
    assert [r[m.R_STATE] for i in out if isinstance(i, ev.SendResults) for r in i.results] == ["failed"]


def test_a_call_for_an_image_on_a_pool_without_a_runtime_fails_with_the_reason():
    s = Scheduler(clock=None, wall_clock=None, pool_offers={"default": {}, "cpu": {"cores": 4}})
    s.bare_pools = {"cpu"}
    s.handle(ev.ServableImage(0.0, PKG["a"], IMG["a"]), ev.CodeFound(0.0, code()))
    rec = call(1, "a")._replace(resources={"pool": "cpu"})
    out = s.handle(ev.TasksArrived(1.0, [rec, call(2, "a")]))
    (res,) = [r for i in out if isinstance(i, ev.SendResults) for r in i.results]
    assert res[m.R_ID] == tid(1) and res[m.R_STATE] == "failed"
    assert "pool 'cpu' runs no container runtime" in res[m.R_ERROR][1]
    assert s.snapshot()["image_queued"] == {IMG["a"]: 1}  # the default pool's call waits for a worker
