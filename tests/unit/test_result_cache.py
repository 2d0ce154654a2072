"""The manager's result cache: the ResultCache itself (counts, LRU by bytes, TTL, persistence), and
the Router with a real TaskStore (SQLite) answering deterministic servable calls from it and
coalescing identical calls in flight."""

from __future__ import annotations

import pytest

from dlhub.manager.result_cache import ResultCache, cache_key
from dlhub.manager.routing import Router
from dlhub.manager.store import TaskStore, make_engine, migrate
from dlhub.protocol import errors
from dlhub.protocol import messages as m

# ---- ResultCache -------------------------------------------------------------------------------


def test_cache_key_names_function_inputs_and_serializer():
    base = cache_key("servable:d1", "k", "auto")
    assert base == cache_key("servable:d1", "k", "auto") and len(base) == 64
    assert base != cache_key("servable:d2", "k", "auto")
    assert base != cache_key("servable:d1", "k2", "auto")
    assert base != cache_key("servable:d1", "k", "json")


def test_hits_and_misses_are_counted():
    cache = ResultCache(max_bytes=1000, clock=lambda: 0.0)
    assert cache.stats()["hit_ratio"] is None
    assert cache.get("a") is None
    cache.put("a", b"\x01one")
    assert cache.get("a") == b"\x01one"
    assert cache.get("a") == b"\x01one"
    assert cache.get("b") is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["stored"]) == (2, 2, 1)
    assert stats["hit_ratio"] == 0.5
    assert (stats["entries"], stats["bytes"], stats["max_bytes"]) == (1, 4, 1000)


def test_lru_eviction_by_bytes():
    cache = ResultCache(max_bytes=10, clock=lambda: 0.0)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now the most recently used
    cache.put("c", b"cccc")  # 12 > 10: the least recently used (b) goes
    assert list(cache.entries) == ["a", "c"]
    assert cache.bytes == 8 and cache.counters["evicted"] == 1
    cache.put("d", b"dddddddd")  # 16: a, then c go
    assert list(cache.entries) == ["d"] and cache.bytes == 8
    assert cache.counters["evicted"] == 3


def test_ttl_expiry_on_an_injected_clock():
    t = [100.0]
    cache = ResultCache(max_bytes=100, ttl_s=60.0, clock=lambda: t[0])
    cache.put("a", b"x")
    t[0] = 159.0
    assert cache.get("a") == b"x"
    t[0] = 160.5
    assert cache.get("a") is None
    stats = cache.stats()
    assert (stats["expired"], stats["misses"], stats["entries"], stats["bytes"]) == (1, 1, 0, 0)
    cache.put("a", b"yy")  # stored again after expiry
    assert cache.get("a") == b"yy"
    # a restored entry keeps its creation time: an old one is already expired
    cache.put("old", b"z", created=t[0] - 61, persist=False)
    assert cache.get("old") is None and cache.counters["expired"] == 2


def test_no_ttl_keeps_entries():
    t = [0.0]
    cache = ResultCache(max_bytes=100, ttl_s=None, clock=lambda: t[0])
    cache.put("a", b"x")
    t[0] = 1e9
    assert cache.get("a") == b"x"


def test_oversize_entries_are_not_stored():
    persisted = []
    cache = ResultCache(max_bytes=4, clock=lambda: 0.0, persist=lambda *a: persisted.append(a))
    cache.put("big", b"12345")
    assert cache.entries == {} and cache.bytes == 0
    assert cache.counters["stored"] == 0 and persisted == []
    cache.put("fits", b"1234")
    assert list(cache.entries) == ["fits"]


def test_persist_is_called_on_put_but_not_for_restored_or_repeated_entries():
    persisted = []
    cache = ResultCache(max_bytes=100, clock=lambda: 42.0, persist=lambda *a: persisted.append(a))
    cache.put("a", b"one")
    assert persisted == [("a", b"one", 42.0)]
    cache.put("a", b"one")  # already held
    cache.put("r", b"restored", created=7.0, persist=False)  # from the store at start
    assert persisted == [("a", b"one", 42.0)]
    assert cache.entries["r"] == (b"restored", 7.0)
    assert cache.counters["stored"] == 2


# ---- the Router with a result cache ------------------------------------------------------------

CLIENT, CLIENT2 = b"c:client-1", b"c:client-2"
EP_ID = b"e:ep:s1"
D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64
VERSIONS = {"jane/model": D1, "jane/model:1": D1, "jane/model:2": D2, "jane/random:1": D3}
DETERMINISTIC = {m.RUN_PREFIX + D1: True, m.RUN_PREFIX + D2: True, m.RUN_PREFIX + D3: False}
KEY = "ab" * 32  # the input digest the client computed
PAYLOAD, RESULT = b"\x01\x91\x05", b"\x01\x0a"


def tid(n: int) -> bytes:
    return n.to_bytes(m.TASK_ID_BYTES, "big")


def call(n: int, ref: str = "jane/model:1", options: dict | None = None) -> list:
    options = {"key": KEY} if options is None else options
    return m.task_record(tid(n), m.REF_PREFIX + ref, PAYLOAD, None, "auto", None, options)


def resolve(ref: str, user: str | None = None) -> str:
    """The Router's name lookup (everything is visible to every user here)."""
    try:
        return m.RUN_PREFIX + VERSIONS[ref]
    except KeyError:
        raise errors.ServableNotFound(f"no servable {ref}") from None


@pytest.fixture
def env(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'dlhub.db'}")
    migrate(engine)
    store = TaskStore(engine, on_commit=lambda acks: None)
    store.start()
    t = [1000.0]
    cache = ResultCache(max_bytes=1 << 20, clock=lambda: t[0])
    router = Router(
        store,
        clock=lambda: t[0],
        known_endpoints=["ep"],
        resolve=resolve,
        result_cache=cache,
        deterministic=lambda f: DETERMINISTIC[f],
    )
    router.endpoint_hello(EP_ID, m.Hello("endpoint", "ep", "tok", "s1", {}, {}))
    router.drain()
    try:
        yield router, store, cache
    finally:
        store.close()


def submit(router: Router, *records: list, client: bytes = CLIENT) -> None:
    router.submit(client, "alice", "sess", m.Submit("ep", list(records)))


def sent_to_endpoint(out) -> list[bytes]:
    return [
        r[m.T_ID] for lk, _, msg in out if lk == "endpoint" and isinstance(msg, m.Tasks) for r in msg.tasks
    ]


def client_results(out, client: bytes = CLIENT) -> dict[bytes, list]:
    return {
        r[m.R_ID]: r
        for lk, ident, msg in out
        if lk == "client" and ident == client and isinstance(msg, m.Results)
        for r in msg.results
    }


def reply(router: Router, n: int, state: str = "succeeded", payload: bytes | None = RESULT) -> None:
    error = None if state == "succeeded" else errors.infra_error("task-error", "boom")
    router.endpoint_results(EP_ID, [m.result_record(tid(n), state, payload, error, [1.0, 2.0])])


def rows(store: TaskStore, *ns: int) -> dict[int, dict]:
    assert store.flush(10)
    found = store.lookup([tid(n) for n in ns])
    return {n: found[tid(n)] for n in ns}


def test_identical_calls_coalesce_into_one_endpoint_task_and_all_get_its_result(env):
    router, store, cache = env
    submit(router, call(1), call(2))
    submit(router, call(3), client=CLIENT2)
    out = router.drain()
    assert sent_to_endpoint(out) == [tid(1)]  # one runs
    assert client_results(out) == {} and client_results(out, CLIENT2) == {}
    assert cache.counters["coalesced"] == 2
    assert router.tasks[tid(1)].record[m.T_FUNCTION] == m.RUN_PREFIX + D1  # resolved
    states = rows(store, 1, 2, 3)
    assert [states[n]["state"] for n in (1, 2, 3)] == ["dispatched", "queued", "queued"]

    reply(router, 1)
    out = router.drain()
    mine, theirs = client_results(out), client_results(out, CLIENT2)
    assert set(mine) == {tid(1), tid(2)} and set(theirs) == {tid(3)}
    for res in [*mine.values(), *theirs.values()]:
        assert res[m.R_STATE] == "succeeded" and res[m.R_PAYLOAD] == RESULT
    assert sent_to_endpoint(out) == []
    key = cache_key(m.RUN_PREFIX + D1, KEY, "auto")
    assert cache.entries[key][0] == RESULT
    assert router.leaders == {} and router.followers == {} and router.tasks == {}
    stored = rows(store, 1, 2, 3)
    assert {r["state"] for r in stored.values()} == {"succeeded"}
    assert {r["result"] for r in stored.values()} == {RESULT}


def test_a_cached_call_is_answered_at_once_without_the_endpoint(env):
    router, store, cache = env
    submit(router, call(1))
    router.drain()
    reply(router, 1)
    router.drain()

    submit(router, call(2))
    out = router.drain()
    assert sent_to_endpoint(out) == []
    res = client_results(out)[tid(2)]
    assert res[m.R_STATE] == "succeeded" and res[m.R_PAYLOAD] == RESULT
    assert cache.counters["hits"] == 1
    assert tid(2) not in router.tasks and router.finished[tid(2)] == "succeeded"
    row = rows(store, 2)[2]
    assert row["state"] == "succeeded" and row["result"] == RESULT and row["options"] is not None
    # also while the endpoint is offline: no endpoint needed
    router.endpoint_gone(EP_ID)
    submit(router, call(3))
    assert client_results(router.drain())[tid(3)][m.R_PAYLOAD] == RESULT
    assert router.status()["result_cache"]["hits"] == 2


def test_latest_resolves_to_the_same_version_and_shares_its_entry(env):
    router, _, _ = env
    submit(router, call(1, "jane/model:1"))
    router.drain()
    reply(router, 1)
    router.drain()
    submit(router, call(2, "jane/model"))
    out = router.drain()
    assert sent_to_endpoint(out) == [] and client_results(out)[tid(2)][m.R_PAYLOAD] == RESULT


def test_cache_false_bypasses_the_cache_and_coalescing(env):
    router, store, cache = env
    submit(router, call(1))
    router.drain()
    reply(router, 1)
    router.drain()
    submit(router, call(2, options={"key": KEY, "cache": False}))
    out = router.drain()
    assert sent_to_endpoint(out) == [tid(2)]  # cached, yet it runs
    assert client_results(out) == {}
    assert router.tasks[tid(2)].cache_key is None
    # not coalesced with an identical call in flight either
    submit(router, call(3, options={"key": "cd" * 32}))
    submit(router, call(4, options={"key": "cd" * 32, "cache": False}))
    assert sent_to_endpoint(router.drain()) == [tid(3), tid(4)]
    # and its result does not replace the cached one
    router.endpoint_results(EP_ID, [m.result_record(tid(2), "succeeded", b"\x01\x0b", None, None)])
    assert client_results(router.drain())[tid(2)][m.R_PAYLOAD] == b"\x01\x0b"
    assert cache.entries[cache_key(m.RUN_PREFIX + D1, KEY, "auto")][0] == RESULT


def test_calls_without_an_input_key_are_not_cached(env):
    router, _, cache = env
    submit(router, call(1, options={}), call(2, options={}))
    assert sent_to_endpoint(router.drain()) == [tid(1), tid(2)]
    reply(router, 1)
    router.drain()
    assert cache.entries == {}


def test_another_version_misses(env):
    router, _, cache = env
    submit(router, call(1, "jane/model:1"))
    router.drain()
    submit(router, call(2, "jane/model:2"))  # same inputs, a new version: not coalesced with v1
    assert sent_to_endpoint(router.drain()) == [tid(2)]
    reply(router, 1)
    router.drain()
    submit(router, call(3, "jane/model:2"))  # v1 is cached; v2's call 2 still runs: coalesced
    assert sent_to_endpoint(router.drain()) == []
    assert cache.counters["coalesced"] == 1
    reply(router, 2, payload=b"\x01\x0c")
    results = client_results(router.drain())
    assert results[tid(2)][m.R_PAYLOAD] == results[tid(3)][m.R_PAYLOAD] == b"\x01\x0c"
    assert cache.entries[cache_key(m.RUN_PREFIX + D1, KEY, "auto")][0] == RESULT
    assert cache.entries[cache_key(m.RUN_PREFIX + D2, KEY, "auto")][0] == b"\x01\x0c"


def test_another_serializer_misses(env):
    router, _, _ = env
    submit(router, call(1))
    router.drain()
    reply(router, 1)
    router.drain()
    rec = call(2)._replace(serializer="json")
    submit(router, rec)
    assert sent_to_endpoint(router.drain()) == [tid(2)]


def test_a_non_deterministic_servable_is_never_cached_or_coalesced(env):
    router, _, cache = env
    submit(router, call(1, "jane/random:1"), call(2, "jane/random:1"))
    assert sent_to_endpoint(router.drain()) == [tid(1), tid(2)]
    reply(router, 1)
    reply(router, 2)
    router.drain()
    submit(router, call(3, "jane/random:1"))
    assert sent_to_endpoint(router.drain()) == [tid(3)]
    assert cache.entries == {} and cache.counters["coalesced"] == 0
    assert router.tasks[tid(3)].cache_key is None


def test_cancelling_a_follower_leaves_the_leader_running(env):
    router, store, _ = env
    submit(router, call(1), call(2), call(3))
    assert sent_to_endpoint(router.drain()) == [tid(1)]
    router.cancel(CLIENT, [tid(2)])
    out = router.drain()
    assert [msg for lk, _, msg in out if lk == "endpoint"] == []  # the endpoint is not involved
    res = client_results(out)[tid(2)]
    assert res[m.R_STATE] == "cancelled" and res[m.R_ERROR][0] == "cancelled"
    assert tid(1) in router.endpoints["ep"].inflight and router.tasks[tid(1)].state == "dispatched"
    assert router.followers[tid(1)] == [tid(3)]

    reply(router, 1)
    results = client_results(router.drain())
    assert set(results) == {tid(1), tid(3)}  # the cancelled follower gets nothing more
    assert rows(store, 2)[2]["state"] == "cancelled"


def test_cancelling_the_leader_is_forwarded_to_the_endpoint(env):
    router, _, _ = env
    submit(router, call(1), call(2))
    router.drain()
    router.cancel(CLIENT, [tid(1)])
    out = router.drain()
    assert [(lk, msg) for lk, _, msg in out] == [("endpoint", m.Cancel([tid(1)]))]


def test_a_failed_leader_makes_its_followers_run_themselves(env):
    router, store, cache = env
    submit(router, call(1), call(2), call(3))
    router.drain()
    reply(router, 1, state="failed", payload=None)
    out = router.drain()
    assert client_results(out)[tid(1)][m.R_STATE] == "failed"
    assert sorted(sent_to_endpoint(out)) == [tid(2), tid(3)]
    assert set(router.endpoints["ep"].inflight) == {tid(2), tid(3)}
    assert router.tasks[tid(2)].state == "dispatched"
    assert router.leaders == {} and router.followers == {} and cache.entries == {}
    reply(router, 2)
    reply(router, 3)
    results = client_results(router.drain())
    assert {r[m.R_STATE] for r in results.values()} == {"succeeded"}


def test_followers_run_after_a_failed_leader_are_stored_as_dispatched(env):
    router, store, _ = env
    submit(router, call(1), call(2))
    router.drain()
    reply(router, 1, state="failed", payload=None)
    router.drain()
    row = rows(store, 2)[2]
    assert row["state"] == "dispatched" and row["t_dispatched"] is not None


def test_a_failed_leader_while_the_endpoint_is_offline_queues_its_followers(env):
    router, _, _ = env
    router.endpoint_gone(EP_ID)
    submit(router, call(1), call(2))
    assert sent_to_endpoint(router.drain()) == []
    router.cancel(CLIENT, [tid(1)])  # pending: cancelled here
    out = router.drain()
    assert client_results(out)[tid(1)][m.R_STATE] == "cancelled"
    assert list(router.endpoints["ep"].pending) == [tid(2)]
    assert router.tasks[tid(2)].state == "queued"
    router.endpoint_hello(EP_ID, m.Hello("endpoint", "ep", "tok", "s1", {}, {}))
    assert sent_to_endpoint(router.drain()) == [tid(2)]


def test_a_leader_sent_after_reconnect_still_leads(env):
    router, _, cache = env
    router.endpoint_gone(EP_ID)
    submit(router, call(1), call(2))
    router.endpoint_hello(EP_ID, m.Hello("endpoint", "ep", "tok", "s2", {}, {}))
    assert sent_to_endpoint(router.drain()) == [tid(1)]
    reply(router, 1)
    assert set(client_results(router.drain())) == {tid(1), tid(2)}
    assert len(cache.entries) == 1


def test_clients_cannot_name_packages_directly(env):
    router, _, _ = env
    rec = m.task_record(tid(1), m.RUN_PREFIX + D1, PAYLOAD, None, "auto", None, {"key": KEY})
    submit(router, rec)
    res = client_results(router.drain())[tid(1)]
    assert res[m.R_STATE] == "failed" and res[m.R_ERROR][0] == "servable-not-found"


def test_followers_for_another_endpoint_run_there_after_a_failed_leader(env):
    """Identical calls to two endpoints coalesce; if the leader fails, each follower runs on the
    endpoint it was submitted for."""
    router, _, _ = env
    other = b"e:ep2:s1"
    router.endpoint_hello(other, m.Hello("endpoint", "ep2", "tok", "s1", {}, {}))
    router.drain()
    submit(router, call(1))
    router.submit(CLIENT, "alice", "sess", m.Submit("ep2", [call(2)]))
    out = router.drain()
    assert sent_to_endpoint(out) == [tid(1)]  # the ep2 call waits for the identical one
    reply(router, 1, state="failed", payload=None)
    out = router.drain()
    [(identity, msg)] = [
        (ident, msg) for lk, ident, msg in out if lk == "endpoint" and isinstance(msg, m.Tasks)
    ]
    assert identity == other and [r[m.T_ID] for r in msg.tasks] == [tid(2)]
