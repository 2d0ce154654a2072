"""The REST API through a real server: auth, JSON errors with status codes, repository reads,
task status for tasks that really ran."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import wait_until

from dlhub.manager.auth import create_user

RECORD = {
    "name": "noop",
    "title": "A no-op servable",
    "description": "Returns nothing, quickly",
    "authors": [{"name": "Doe, Jane"}],
    "domains": ["testing"],
    "kind": "function",
    "entry_point": "sha256:" + "0" * 64,
}


def square(x):
    return x * x


@pytest.fixture
def api(custom_stack_factory):
    cs = custom_stack_factory(name="rest-ep")
    url = cs.manager.api.url
    wait_until(lambda: _up(url), 10, what="the REST server")
    admin = {"Authorization": f"Bearer {cs.token}"}
    bob_token = create_user(cs.manager.repository.engine, "bob", "user")
    bob = {"Authorization": f"Bearer {bob_token}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        yield cs, client, admin, bob


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_call_but_health_needs_a_valid_bearer_token(api):
    _, client, _, _ = api
    assert client.get("/api/v1/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        r = client.get("/api/v1/servables", headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "access-denied"


def test_errors_are_json_with_a_code_and_the_right_status(api):
    _, client, admin, _ = api
    r = client.get("/api/v1/servables/admin/absent", headers=admin)
    assert (r.status_code, r.json()["code"]) == (404, "not-found") and "admin/absent" in r.json()["message"]
    r = client.get("/api/v1/servables", params={"limit": 0}, headers=admin)
    assert (r.status_code, r.json()["code"]) == (422, "invalid-request") and "limit" in r.json()["message"]
    r = client.get("/api/v1/tasks/not-hex", headers=admin)
    assert (r.status_code, r.json()["code"]) == (422, "invalid-request")
    r = client.get("/api/v1/no/such/route", headers=admin)
    assert r.status_code == 404 and r.json()["code"] == "http"


def test_search_describe_versions_and_delete(api):
    cs, client, admin, bob = api
    repo = cs.manager.repository
    for _ in range(2):
        rec = repo.publish("admin", RECORD, {})
        repo.mark_ready("admin", rec.name, rec.version)
    repo.publish("admin", RECORD, {})  # v3 pending: hidden from search, shown in versions
    hits = client.get("/api/v1/servables", params={"q": "no-op", "domain": "testing"}, headers=admin).json()
    assert hits["count"] == 1 and hits["results"][0]["version"] == 2
    desc = client.get("/api/v1/servables/admin/noop", headers=bob).json()
    assert (
        desc["status"] == "ready"
        and desc["record"]["version"] == 2
        and desc["record"]["title"] == RECORD["title"]
    )
    assert [v["status"] for v in desc["versions"]] == ["ready", "ready", "pending"]
    pinned = client.get("/api/v1/servables/admin/noop", params={"version": 3}, headers=admin).json()
    assert pinned["status"] == "pending"
    versions = client.get("/api/v1/servables/admin/noop/versions", headers=admin).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    r = client.delete("/api/v1/servables/admin/noop/2", headers=bob)  # not bob's
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    assert client.delete("/api/v1/servables/admin/noop/2", headers=admin).json() == {"deleted": 1}
    assert client.get("/api/v1/servables/admin/noop", headers=admin).json()["record"]["version"] == 1
    assert client.delete("/api/v1/servables/admin/noop", headers=admin).json() == {"deleted": 2}
    assert client.get("/api/v1/servables/admin/noop/versions", headers=admin).status_code == 200
    assert client.get("/api/v1/servables", params={"q": "no-op"}, headers=admin).json()["count"] == 0


def test_a_task_just_answered_reads_finished_before_its_row_is_committed(api):
    """The Executor gets a result before the group commit writes its row; asking the REST API
    at once must read the finished task, not "there is no task" (the row is not there yet) or
    a state it left. The commit window is stretched to 1 s so the row is surely behind."""
    cs, client, admin, _ = api
    ex = cs.executor()
    assert ex.submit(square, 2).result(30) == 4  # the function's code is known: one round trip
    cs.manager.store.commit_interval_s = 1.0
    try:
        for x in (3, 4, 5):
            fut = ex.submit(square, x)
            assert fut.result(30) == x * x
            r = client.get(f"/api/v1/tasks/{fut.task_id}", headers=admin)
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "succeeded", r.json()
            # /result reads the finished row too (a Python client's result: not JSON, said so)
            r = client.get(f"/api/v1/tasks/{fut.task_id}/result", headers=admin)
            assert (r.status_code, r.json()["code"]) == (406, "not-json"), r.text
    finally:
        cs.manager.store.commit_interval_s = 0.02


def test_task_status_of_a_task_that_ran(api):
    cs, client, admin, bob = api
    fut = cs.executor().submit(square, 9)
    assert fut.result(30) == 81

    def finished():
        r = client.get(f"/api/v1/tasks/{fut.task_id}", headers=admin)
        return r.json() if r.status_code == 200 and r.json()["state"] == "succeeded" else None

    body = wait_until(finished, 10, what="the task's committed state")
    assert body["owner"] == "admin" and body["endpoint"] == "rest-ep"
    assert body["t_received"] <= body["t_finished"]
    assert "payload" not in body and "result" not in body  # results travel on the data plane
    r = client.get(f"/api/v1/tasks/{fut.task_id}", headers=bob)  # another user's task: as unknown
    assert (r.status_code, r.json()["code"]) == (404, "not-found")
    r = client.get(f"/api/v1/tasks/{'00' * 16}", headers=admin)
    assert (r.status_code, r.json()["code"]) == (404, "not-found")


def test_openapi_document_lists_the_api(api):
    _, client, _, _ = api
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    paths = doc["paths"]
    expected = {
        "/api/v1/servables": {"get", "post"},
        "/api/v1/servables/{owner}/{name}": {"get", "delete"},
        "/api/v1/servables/{owner}/{name}/run": {"post"},
        "/api/v1/tasks/{task_id}": {"get"},
        "/api/v1/tasks/{task_id}/result": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, f"{path} missing from {sorted(paths)}"
        assert methods <= set(paths[path]), (path, sorted(paths[path]))
        for method in methods:  # each operation documents its answers
            assert paths[path][method]["responses"], (path, method)


def test_dlhub_up_writes_the_rest_url(stack):
    config = json.loads((stack.home / "config.json").read_text())
    assert config["rest_url"].startswith("http://127.0.0.1:")
    assert httpx.get(config["rest_url"] + "/api/v1/health", timeout=5).json() == {"status": "ok"}


def test_the_python_client_reads_the_repository_and_maps_errors(api, tmp_path):
    from dlhub.executor import Client, NotFoundError
    from dlhub.protocol import AccessDenied

    cs, _, _, bob = api
    repo = cs.manager.repository
    rec = repo.publish("admin", {**RECORD, "name": "composition-featurizer", "domains": ["materials"]}, {})
    repo.mark_ready("admin", rec.name, rec.version)
    with Client(cs.manager.api.url, cs.token) as client:
        hits = client.search("featurizer", domain="materials")
        assert [h["name"] for h in hits] == ["composition-featurizer"]
        described = client.describe("admin/composition-featurizer")
        assert described["status"] == "ready" and described["record"]["version"] == 1
        assert client.describe("admin/composition-featurizer:1")["record"]["name"] == "composition-featurizer"
        assert [v["version"] for v in client.versions("admin/composition-featurizer")] == [1]
        with pytest.raises(NotFoundError, match="admin/absent"):
            client.describe("admin/absent")
        with pytest.raises(ValueError, match="is not a servable reference"):
            client.describe("no-owner")
        fut = cs.executor().submit(square, 4)
        assert fut.result(30) == 16
        assert wait_until(lambda: client.task(fut.task_id)["state"] == "succeeded", 10, what="task")
        assert client.delete("admin/composition-featurizer") == 1
        assert client.search("featurizer") == []
    bob_token = bob["Authorization"].split()[1]
    with Client(cs.manager.api.url, bob_token) as as_bob:
        rec2 = repo.publish("admin", {**RECORD, "name": "kept"}, {})
        with pytest.raises(AccessDenied, match="may not change servables of admin"):
            as_bob.delete(f"admin/kept:{rec2.version}")
    with Client(cs.manager.api.url, "wrong") as bad, pytest.raises(AccessDenied):
        bad.search()
    # no token at all (and none in the home): the manager's 401, not an illegal empty header
    with Client(cs.manager.api.url, home=str(tmp_path)) as anonymous, pytest.raises(AccessDenied):
        anonymous.search()


def test_the_client_reads_url_and_token_from_dlhub_home(stack):
    from dlhub.executor import Client

    with Client(home=str(stack.home)) as client:
        assert client.search("anything-at-all") == []
