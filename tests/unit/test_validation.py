"""What endpoints and pools report is validated field by field before the manager keeps it: a
malformed Heartbeat is logged naming the field and never reaches /metrics or `dlhub status`; a
malformed result fails its task with a ``protocol`` error instead of leaving it unfinished."""

from __future__ import annotations

import json
import logging

import pytest

from dlhub.manager.metrics import prometheus_text
from dlhub.manager.routing import Router
from dlhub.manager.store import TaskStore, make_engine, migrate, unpack_error
from dlhub.protocol import messages as m

EP_ID = b"e:ep:s1"
CLIENT = b"c:client-1"

GOOD_INFO = {
    "workers": 2,
    "queued": 0,
    "outstanding": 1,
    "busy_workers": 1,
    "on_workers": 1,
    "heartbeat_s": 1.0,
    "queued_by_pool": {"default": 0},
    "servables": {"examples/x": {"loads": 1, "batches": 0}},
    "pools": {"p1": {"workers": 2, "block_id": "default/0", "draining": False}},
    "batching": {"batch_size_histogram": {"4": 2}, "queue_delay_ms": {"mean": None, "max": 0.0, "count": 0}},
    "received": 3,
    "completed": 2,
    "failed": 0,
}

BAD_INFOS = [  # (info, the field the error must name)
    ({"workers": "many"}, "info.workers"),
    ({"workers": -1}, "info.workers"),
    ({"queued": 2**70}, "info.queued"),
    ({"servables": {"x": {"loads": "a"}}}, "info.servables.x.loads"),
    ({"servables": [1, 2]}, "info.servables"),
    ({"batching": {"batch_size_histogram": {"abc": 1}}}, "info.batching.batch_size_histogram"),
    ({"batching": {"queue_delay_ms": {"count": "x"}}}, "info.batching.queue_delay_ms.count"),
    ({"pools": {"p": {"workers": None}}}, "info.pools.p.workers"),
    ({"extra": b"\x00bytes"}, "info.extra"),
    ({1: 2}, "key 1"),
    ("not a mapping", "info"),
]


@pytest.mark.parametrize(("info", "field"), BAD_INFOS)
def test_malformed_heartbeat_info_is_named(info, field):
    problem = m.check_heartbeat_info(info)
    assert problem and field in problem


def test_good_heartbeat_info_passes():
    assert m.check_heartbeat_info(GOOD_INFO) is None
    assert m.check_heartbeat_info({}) is None
    assert m.check_pool_info({"workers": 3}) is None
    assert "info.workers" in m.check_pool_info({"workers": "3"})


@pytest.fixture
def router(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'dlhub.db'}")
    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None)
    store.start()
    r = Router(store, clock=lambda: 1000.0, endpoint_timeout_s=30.0, known_endpoints=["ep"])
    hello = m.Hello("endpoint", "ep", "tok", "s1", {"python": "3.11"}, {"pid": 1})
    r.endpoint_hello(EP_ID, hello)
    r.drain()
    try:
        yield r, store
    finally:
        store.close()


@pytest.mark.parametrize(("info", "field"), BAD_INFOS[:-2])
def test_a_malformed_heartbeat_never_reaches_the_metrics(router, caplog, info, field):
    r, _ = router
    assert r.endpoint_heartbeat(EP_ID, GOOD_INFO)
    with caplog.at_level(logging.WARNING, "dlhub.manager.routing"):
        assert r.endpoint_heartbeat(EP_ID, info)
    assert field in caplog.text and "'ep'" in caplog.text
    status = r.status()
    assert status["endpoints"]["ep"]["info"] == GOOD_INFO  # the last good report is kept
    json.dumps(status)  # /api/v1/metrics
    assert b"dlhub_endpoint_workers" in prometheus_text(status)  # /metrics


def test_metrics_survive_an_odd_endpoint_report():
    """Defence in depth: an endpoint whose info the text exposition cannot read is skipped."""
    status = {
        "endpoints": {"a": {"connected": True, "info": {"batching": {"batch_size_histogram": {"x": 1}}}}}
    }
    status["endpoints"]["b"] = {"connected": True, "info": GOOD_INFO}
    text = prometheus_text(status).decode()
    assert 'dlhub_endpoint_workers{endpoint="b"} 2.0' in text and 'endpoint="a"' not in text


BAD_RESULTS = [  # (record after the task id, what the error must say)
    (["bogus", None, None, None, None], "state"),
    (["running", None, None, None, None], "state"),
    (["succeeded", "not bytes", None, None, None], "payload"),
    (["failed", None, 5, None, None], "error"),
    (["failed", None, ["code", 7, "", None], None, None], "message"),
    (["succeeded", b"\x01\x05", None, ["a", "b"], None], "timing"),
    (["succeeded", b"\x01\x05", None, None, [1, 2]], "output"),
    (["succeeded", b"\x01\x05", None, None, "out"], "output"),
]


@pytest.mark.parametrize(("rest", "word"), BAD_RESULTS)
def test_a_malformed_result_fails_its_task_with_the_reason(router, caplog, rest, word):
    r, store = router
    task_id = (7).to_bytes(m.TASK_ID_BYTES, "big")
    r.submit(CLIENT, "alice", "s", m.Submit("ep", [m.task_record(task_id, "sha256:f", b"\x01\x90")]))
    r.drain()
    with caplog.at_level(logging.WARNING, "dlhub.manager.routing"):
        r.endpoint_results(EP_ID, [[task_id, *rest]])
    assert task_id.hex() in caplog.text and word in caplog.text
    assert task_id not in r.tasks  # finished, not left open
    sent = [msg for link, ident, msg in r.drain() if link == "client" and isinstance(msg, m.Results)]
    (res,) = sent[0].results
    assert res[m.R_STATE] == "failed"
    code, message = res[m.R_ERROR][:2]
    assert code == "protocol" and "malformed result" in message and word in message
    assert store.flush(10)
    row = store.lookup([task_id])[task_id]
    assert row["state"] == "failed" and unpack_error(row["error"])[0] == "protocol"
    # the message round-trips the wire, and a good result in the same batch still counts
    assert m.unpack(m.pack(sent[0])) == sent[0]


def test_good_results_beside_a_bad_one_finish_normally(router):
    r, _ = router
    ids = [(n).to_bytes(m.TASK_ID_BYTES, "big") for n in (1, 2)]
    r.submit(CLIENT, "alice", "s", m.Submit("ep", [m.task_record(t, "sha256:f", b"\x01\x90") for t in ids]))
    r.drain()
    r.endpoint_results(EP_ID, [m.result_record(ids[0], "succeeded", b"\x01\x05"), [ids[1], "x", 1, 2, 3, 4]])
    (msg,) = [msg for link, _, msg in r.drain() if link == "client"]
    states = {res[m.R_ID]: res[m.R_STATE] for res in msg.results}
    assert states == {ids[0]: "succeeded", ids[1]: "failed"}


# ---- LIKE wildcards in search filters, on SQLite and PostgreSQL ---------------------------------


def test_like_wildcards_in_search_filters_are_literal(tmp_path, db_url):
    from dlhub.manager.repository import Repository
    from dlhub.manager.store import make_engine, migrate

    engine = make_engine(db_url)
    migrate(engine)
    repo = Repository(engine, tmp_path / "blobs")
    base = {"title": "t", "kind": "function", "entry_point": "sha256:" + "0" * 64}
    for name, domain, author in (
        ("a", "materials_science", "Doe, Jane"),
        ("b", "materialsxscience", "100% Smith"),
    ):
        repo.publish("jane", {**base, "name": name, "domains": [domain], "authors": [{"name": author}]}, {})
        repo.mark_ready("jane", name, 1)
    try:

        def names(**filters) -> list[str]:
            return sorted(h["name"] for h in repo.search(**filters))

        assert names(domain="materials_science") == ["a"]  # `_` is not "any character"
        assert names(domain="%") == [] and names(domain="_") == [] and names(domain="m%") == []
        assert names(author="100% smith") == ["b"] and names(author="%smith") == []
        assert names(related="%") == []
        assert names(domain="materials\\science") == []
    finally:
        engine.dispose()
