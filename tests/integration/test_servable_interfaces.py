"""Servables through their interfaces on the session stack: REST runs (sync, async, errors,
JSON results), the `dlhub` repository commands, and search with its filters."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from conftest import RESULT_TIMEOUT_S, meta, wait_until
from servable_fns import (
    OWNER,
    double,
    half_steps,
    halve_non_negative,
    triple,
    write_module,
)

from dlhub.executor import PublishError, RemoteError, Servable, ServableNotFound

# ---- 6. REST runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halver(client):
    name = f"rest-halver-{uuid.uuid4().hex[:6]}"
    client.publish(Servable.from_function(halve_non_negative, **meta(name, examples=[((4,), 2.0)])))
    return name


def test_rest_run_sync(rest, halver):
    http, auth = rest
    r = http.post(f"/api/v1/servables/{OWNER}/{halver}/run", json={"args": [10]}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == 5.0 and r.json()["state"] == "succeeded"
    r = http.post(
        f"/api/v1/servables/{OWNER}/{halver}/run", json={"kwargs": {"x": 3}, "version": 1}, headers=auth
    )
    assert (r.status_code, r.json()["result"]) == (200, 1.5)


def test_rest_run_async_then_poll(rest, halver):
    http, auth = rest
    r = http.post(f"/api/v1/servables/{OWNER}/{halver}/run", json={"args": [6], "wait_s": 0}, headers=auth)
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", task_id)
    location = r.headers["Location"]
    assert location == f"/api/v1/tasks/{task_id}/result"

    def finished():
        res = http.get(location, headers=auth)
        assert res.status_code in (200, 202), res.text
        return res if res.status_code == 200 else None

    done = wait_until(finished, RESULT_TIMEOUT_S, interval=0.05, what="the async REST result")
    assert done.json()["result"] == 3.0
    record = http.get(f"/api/v1/tasks/{task_id}", headers=auth).json()
    assert record["state"] == "succeeded" and record["owner"] == OWNER


def test_rest_run_errors(rest, halver, name):
    http, auth = rest
    url = f"/api/v1/servables/{OWNER}/{halver}/run"
    r = http.post(url, json={"args": [-1]}, headers=auth)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "task-failed" and "negative input: -1" in body["message"]
    assert "ValueError" in body["message"]

    r = http.post(f"/api/v1/servables/{OWNER}/{name}/run", json={"args": [1]}, headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "servable-not-found"
    assert f"{OWNER}/{name}" in r.json()["message"]
    r = http.post(url, json={"args": [1], "version": 99}, headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "servable-not-found"

    r = http.post(url, json={"args": [1]})
    assert r.status_code == 401 and r.json()["code"] == "access-denied"
    r = http.post(url, json={"args": [1]}, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    r = http.post(url, json={"args": [1], "wait_s": -1}, headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "invalid-request" and "wait_s" in r.json()["message"]


def test_client_run_and_numpy_results_as_json(client, halver, name):
    assert client.run(f"{OWNER}/{halver}", 9) == 4.5
    assert client.run(f"{OWNER}/{halver}:1", x=1) == 0.5
    assert client.run(f"{OWNER}/{halver}", 8, wait_s=0.01) == 4.0  # polls after a 202
    with pytest.raises(RemoteError, match="negative input: -3") as failed:
        client.run(f"{OWNER}/{halver}", -3)
    assert failed.value.remote_type == "ValueError"
    with pytest.raises(ServableNotFound):
        client.run(f"{OWNER}/{name}-absent", 1)

    client.publish(Servable.from_function(half_steps, **meta(name, examples=[((3,), [0.0, 0.5, 1.0])])))
    value = client.run(f"{OWNER}/{name}", 4)
    assert value == [0.0, 0.5, 1.0, 1.5] and isinstance(value, list)


# ---- 7. the CLI ----------------------------------------------------------------------------------


def test_cli_publish_search_describe_versions_run_delete(stack, name, tmp_path):
    path = write_module(
        tmp_path,
        "cli_fns",
        '''
        def shout(word):
            """Shout a word."""
            return word.upper() + "!"
        ''',
    )
    keyword = f"kw{uuid.uuid4().hex[:8]}"
    ref = f"{OWNER}/{name}"
    p = stack.cli(
        "publish", f"{path}:shout", "--name", name, "--example", '[["hi"], "HI!"]',
        "--example", '[["a b"], "A B!"]', "--keyword", keyword, "--domain", "linguistics",
        "--author", "Doe, Jane",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{ref}:1"

    p = stack.cli("search", keyword, "--json")
    assert p.returncode == 0, p.stderr
    hits = json.loads(p.stdout)
    assert [(h["name"], h["version"], h["status"]) for h in hits] == [(name, 1, "ready")]
    assert hits[0]["title"] == "Shout a word." and hits[0]["domains"] == ["linguistics"]
    p = stack.cli("search", keyword)
    assert p.returncode == 0 and "function" in p.stdout
    p = stack.cli("search", f"{keyword}zzz")
    assert p.returncode == 0 and "no servables found" in p.stdout

    p = stack.cli("describe", ref)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{ref}:1  [ready]  Shout a word.")
    assert "examples: 2" in p.stdout and "versions: 1 (ready)" in p.stdout
    p = stack.cli("describe", ref, "--json")
    assert json.loads(p.stdout)["status"] == "ready"

    p = stack.cli("versions", ref)
    assert p.returncode == 0 and p.stdout.split() == ["1", "ready"]

    p = stack.cli("run", ref, "hey")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == "HEY!"
    p = stack.cli("run", f"{ref}:1", '"42"')  # JSON-quoted: a string, not a number
    assert json.loads(p.stdout) == "42!"

    p = stack.cli("delete", ref, "--yes")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"deleted 1 version of {ref}"
    p = stack.cli("run", ref, "hey")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "ServableNotFound" in p.stderr and "was deleted" in p.stderr
    p = stack.cli("search", keyword, "--json")
    assert json.loads(p.stdout) == []


def test_cli_failing_publish_is_one_line_without_traceback(stack, name, tmp_path):
    path = write_module(tmp_path, "cli_bad", "def shout(word):\n    return word.upper()\n")
    p = stack.cli("publish", f"{path}:shout", "--name", name, "--example", '[["hi"], "HI!"]')
    assert p.returncode != 0
    *stages, error = p.stderr.strip().splitlines()  # progress lines (stderr is a pipe), then the error
    assert [line.split(" ")[0] for line in stages] == ["uploading", "verifying"], p.stderr
    assert "Traceback" not in p.stderr
    assert "PublishError" in error and "example 0 gave a different output" in error
    p = stack.cli("describe", f"{OWNER}/{name}")
    assert p.returncode == 0 and "[failed]" in p.stdout and "error: " in p.stdout

    p = stack.cli(
        "publish", f"{path}:shout", "--name", name, "--requirement", "definitely-not-installed-pkg>=1"
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "definitely-not-installed-pkg" in p.stderr
    p = stack.cli("versions", f"{OWNER}/{name}")
    assert [line.split()[:2] for line in p.stdout.splitlines()] == [["1", "failed"], ["2", "failed"]]

    p = stack.cli("publish", f"{path}:absent", "--name", name)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "no function 'absent'" in p.stderr
    p = stack.cli("publish", f"{path}:shout", "--name", name, "--example", "not json")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--example" in p.stderr
    p = stack.cli("publish", f"{path}:shout", "--name", "Bad_Name")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "RecordError" in p.stderr
    p = stack.cli("run", f"{OWNER}/{name}", "hi")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "no ready version" in p.stderr


# ---- 8. search -----------------------------------------------------------------------------------


def test_search_by_words_and_filters_shows_only_ready_versions(client, name):
    tag = f"tag{uuid.uuid4().hex[:8]}"
    bandgap, protein, broken = f"{name}-bandgap", f"{name}-protein", f"{name}-broken"
    client.publish(
        Servable.from_function(
            double,
            **meta(
                bandgap,
                title="Bandgap predictor for perovskites",
                keywords=["bandgap", tag],
                domains=["materials"],
                authors=["Curie, Marie"],
            ),
        )
    )
    client.publish(
        Servable.from_function(
            triple,
            **meta(
                protein,
                title="Protein folding scorer",
                description="Scores folds",
                keywords=[tag],
                domains=["biology"],
                authors=[{"name": "Franklin, Rosalind", "affiliation": "King's College"}],
            ),
        )
    )
    with pytest.raises(PublishError):  # a failed version of a third one: never found
        client.publish(Servable.from_function(double, **meta(broken, keywords=[tag], examples=[((1,), 3)])))
    with pytest.raises(PublishError):  # a failed v2 of the first: search still shows v1
        client.publish(
            Servable.from_function(
                double, **meta(bandgap, title="Bandgap v2", keywords=[tag], examples=[((1,), 3)])
            )
        )

    def names(*args, **kwargs):
        return sorted(hit["name"] for hit in client.search(*args, **kwargs))

    assert names(tag) == sorted([bandgap, protein])
    hits = client.search(tag)
    assert all(h["status"] == "ready" for h in hits)
    assert {h["name"]: h["version"] for h in hits}[bandgap] == 1
    assert names(f"perovskite {tag}") == [bandgap]  # plural and prefix words match
    assert names(f"folding {tag}") == [protein]
    assert names(f"scores {tag}") == [protein]  # description
    assert [h["name"] for h in client.search(f"{tag} perovskites bandgap")] == [bandgap]
    assert names(f"bandgap protein {tag}") == []  # every word must match
    assert names(tag, domain="biology") == [protein]
    assert names(tag, domain="Materials") == [bandgap]
    assert names(tag, owner=OWNER) == sorted([bandgap, protein])
    assert names(tag, owner="somebody-else") == []
    assert names(tag, author="Curie, Marie") == [bandgap]
    assert names(tag, author="Franklin, Rosalind") == [protein]
    assert names(tag, author="Curie, Marie", domain="biology") == []
    assert names(tag, limit=1) in ([bandgap], [protein])
    assert client.search(f"{tag}nomatch") == []

    # only_latest=False lists every ready version; a deleted one disappears
    client.publish(Servable.from_function(triple, **meta(bandgap, keywords=[tag])))
    every = [(h["name"], h["version"]) for h in client.search(tag, only_latest=False) if h["name"] == bandgap]
    assert sorted(every) == [(bandgap, 1), (bandgap, 3)]
    latest = [h["version"] for h in client.search(tag) if h["name"] == bandgap]
    assert latest == [3]
    client.delete(f"{OWNER}/{bandgap}:3")
    assert [h["version"] for h in client.search(tag) if h["name"] == bandgap] == [1]
    client.delete(f"{OWNER}/{protein}")
    assert names(tag) == [bandgap]


def test_publish_without_waiting_then_verification_finishes(client, ex, name):
    ref = client.publish(Servable.from_function(double, **meta(name, examples=[((1,), 2)])), wait=False)
    assert ref == f"{OWNER}/{name}:1"
    status = client.describe(ref)["status"]
    assert status in ("pending", "ready")
    wait_until(lambda: client.describe(ref)["status"] == "ready", RESULT_TIMEOUT_S, interval=0.05)
    assert ex.submit(ref, 4).result(RESULT_TIMEOUT_S) == 8
    assert client.whoami() == OWNER


# ---- regressions ---------------------------------------------------------------------------------


def test_cli_invalid_name_is_a_one_line_error(stack, tmp_path):
    path = write_module(tmp_path, "cli_name", "def fn(x):\n    return x\n")
    p = stack.cli("publish", f"{path}:fn", "--name", "Bad_Name")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
