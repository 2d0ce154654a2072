"""Data sets on a real manager process (``dlhub up`` on 127.0.0.1; issue 16, items 1-2): publish
through ``Client.publish_dataset`` and ``dlhub publish-dataset`` (chunked upload, resumed after an
interruption), find with ``search(kind="dataset")``, download streamed and sha256-checked
(``Client.download``, ``dlhub download``); links both ways with a servable trained on it; a
private data set is "not found" for another user everywhere and cannot be linked by them; bad
input over REST is a clear error and the manager keeps serving."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest
from conftest import meta

from dlhub.executor import Client, Dataset, Servable
from dlhub.executor.client import NotFoundError
from dlhub.manager.auth import create_user
from dlhub.manager.store import make_engine


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def predict_gap(x):
    return x * 2


@pytest.fixture(scope="module")
def rest_url(stack) -> str:
    return json.loads((stack.home / "config.json").read_text())["rest_url"]


@pytest.fixture(scope="module")
def bob(stack, rest_url, tmp_path_factory):
    """A second, ordinary user with a home of their own (for the CLI)."""
    engine = make_engine(f"sqlite:///{stack.home / 'manager' / 'dlhub.db'}")
    token = create_user(engine, "bob")
    engine.dispose()
    home = tmp_path_factory.mktemp("home-bob")
    (home / "config.json").write_text(json.dumps({"rest_url": rest_url, "token": token}))
    with Client(rest_url, token) as c:
        yield c


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "scans"
    (root / "sub").mkdir(parents=True)
    big = os.urandom(9 * 1024 * 1024 + 17)  # two chunks and a bit
    (root / "big.bin").write_bytes(big)
    (root / "sub" / "notes.txt").write_text("measured at 300 K\n")
    (root / "sub" / "odd name #1?.txt").write_text("odd\n")  # quoted in the download URL
    return root


def test_publish_search_download_and_links_both_ways(stack, client, folder, tmp_path, name, ex):
    ds = Dataset(
        name,
        title="Band gap scans",
        authors=["Doe, Jane"],
        files=folder,
        description="Scans of band gaps",
        domains=["materials science"],
        keywords=["bandgap"],
        license="CC-BY-4.0",
        doi="10.5281/zenodo.1234",
        external={"remote.h5": {"url": "https://127.0.0.1:9/remote.h5", "size": 5, "sha256": sha(b"far!!")}},
    )
    ref = client.publish_dataset(ds)
    owner = ref.split("/")[0]
    assert ref == f"{owner}/{name}:1"
    hits = client.search("band gap scans", kind="dataset")
    assert [h["name"] for h in hits if h["name"] == name] == [name]
    assert all(h["name"] != name for h in client.search("band gap scans"))  # not a servable
    rest = client._http.get("/datasets", params={"q": "bandgap", "owner": owner}).json()["results"]
    mine = [(h["name"], h["file_count"], h["type"]) for h in rest if h["name"] == name]
    assert mine == [(name, 4, "dataset")]  # 3 stored + 1 external

    got = client.download(ref, to=tmp_path / "out", file="big.bin")
    assert got == [tmp_path / "out" / "big.bin"]
    assert got[0].read_bytes() == (folder / "big.bin").read_bytes()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".part")]
    with pytest.raises(Exception, match="cannot download"):
        client.download(ref, to=tmp_path / "out", file="remote.h5")  # fetched from its URL: unreachable
    assert not (tmp_path / "out" / "remote.h5").exists()

    # a servable trained on it: describe shows each side, search filters both ways
    servable = Servable.from_function(
        predict_gap,
        **meta(f"{name}-model"),
        examples=[{"args": [2], "output": 4}],
        trained_on=[f"{owner}/{name}"],
    )
    model = client.publish(servable)
    info = client.describe(model)
    assert info["record"]["trained_on"] == [ref]
    assert info["datasets"] == [{"ref": ref, "relation": "trained_on", "title": "Band gap scans"}]
    described = client.describe(ref)
    assert described["type"] == "dataset" and described["servables"][0]["ref"] == model
    assert [h["name"] for h in client.search(dataset=f"{owner}/{name}")] == [f"{name}-model"]
    assert [h["name"] for h in client.search(servable=model, kind="dataset")] == [name]
    assert ex.submit(model, 21).result(60) == 42  # it still runs as any servable

    out = stack.cli("describe", ref)
    assert out.returncode == 0, out.stderr
    assert f"used by: {model} (trained on, ready)" in out.stdout and "big.bin" in out.stdout
    out = stack.cli("describe", model)
    assert f"trained on: {ref} (Band gap scans)" in out.stdout
    out = stack.cli("search", "--kind", "dataset", "--servable", model, "--json")
    assert [h["name"] for h in json.loads(out.stdout)] == [name], out.stderr


def test_cli_publish_dataset_and_download(stack, folder, tmp_path, name):
    out = stack.cli("publish-dataset", str(folder), "--title", "Scans from the CLI", "--name", name,
                    "--keyword", "cli")  # fmt: skip
    assert out.returncode == 0, out.stderr
    ref = out.stdout.strip().splitlines()[-1]
    assert ref.endswith(f"/{name}:1")
    assert [v["version"] for v in Client(home=str(stack.home)).versions(ref)] == [1]
    out = stack.cli("download", ref, "sub/notes.txt", "--to", str(tmp_path / "dl"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "dl" / "sub" / "notes.txt").read_text() == "measured at 300 K\n"
    out = stack.cli("download", ref, "--to", str(tmp_path / "all"))
    assert (tmp_path / "all" / "big.bin").read_bytes() == (folder / "big.bin").read_bytes()
    assert (tmp_path / "all" / "sub" / "odd name #1?.txt").read_text() == "odd\n"
    out = stack.cli("search", "--kind", "dataset", "scans from the cli", "--json")
    assert name in [h["name"] for h in json.loads(out.stdout)]
    out = stack.cli("download", ref.replace(name, "no-such-data"))
    assert out.returncode == 1 and f"there is no data set {ref.split('/')[0]}/no-such-data:1" in out.stderr


def test_an_interrupted_upload_resumes_where_the_manager_stopped(stack, client, folder, name, rest_url):
    data = (folder / "big.bin").read_bytes()
    http = client._http
    begun = http.post("/uploads", json={"size": len(data), "sha256": sha(data)}).json()
    first = 5 * 1024 * 1024
    assert http.put(f"/uploads/{begun['upload_id']}", params={"offset": 0}, content=data[:first]).is_success
    # the client's own record of that unfinished upload (as a publish interrupted there leaves it)
    (stack.home / "uploads.json").write_text(json.dumps({f"{client.url} {sha(data)}": begun["upload_id"]}))
    offsets = []
    real = client._request

    def spy(method, path, **kwargs):
        if method == "PUT":
            offsets.append(kwargs["params"]["offset"])
        return real(method, path, **kwargs)

    client._request = spy
    try:
        ref = client.publish_dataset(
            Dataset(name, title="Resumed", authors=["Doe, Jane"], files=[folder / "big.bin"])
        )
    finally:
        client._request = real
    assert offsets == [first]  # only the rest was sent
    assert json.loads((stack.home / "uploads.json").read_text()) == {}
    assert client.describe(ref)["record"]["files"]["big.bin"]["sha256"] == sha(data)

    # a stale record (the manager discarded that upload, or never had it): a fresh upload
    notes = folder / "sub" / "notes.txt"
    stale = {f"{client.url} {sha(notes.read_bytes())}": "0" * 32}
    (stack.home / "uploads.json").write_text(json.dumps(stale))
    ref = client.publish_dataset(Dataset(f"{name}-2", title="Fresh", authors=["Doe, Jane"], files=[notes]))
    assert ref.endswith(f"/{name}-2:1")


def test_bad_input_is_a_clear_error_and_the_manager_keeps_serving(client, name):
    http = client._http
    data = b"0123456789"
    uid = http.post("/uploads", json={"size": 10, "sha256": sha(data)}).json()["upload_id"]
    http.put(f"/uploads/{uid}", params={"offset": 0}, content=data[:4])
    wrong = http.put(f"/uploads/{uid}", params={"offset": 2}, content=data[2:])
    assert wrong.status_code == 409 and wrong.json()["code"] == "offset-mismatch"
    assert wrong.json()["expected"] == 4 and "resume at offset 4" in wrong.json()["message"]
    http.put(f"/uploads/{uid}", params={"offset": 4}, content=b"XXXXXX")  # not the declared bytes
    bad = http.post(f"/uploads/{uid}/complete")
    assert bad.status_code == 422 and bad.json()["code"] == "digest-mismatch"
    assert http.get(f"/uploads/{uid}").status_code == 404  # discarded
    assert http.post("/uploads", json={"size": -1, "sha256": sha(data)}).status_code == 422
    assert http.post("/uploads", json={"size": 1, "sha256": "md5:x"}).status_code == 422
    assert http.get("/uploads/" + "0" * 32).json()["code"] == "not-found"

    record = {
        "name": name,
        "title": "T",
        "authors": [{"name": "A"}],
        "files": {"a": {"sha256": sha(data), "size": 10}},
    }
    missing = http.post("/datasets", json={"record": record})
    assert missing.status_code == 400 and "was not uploaded" in missing.json()["message"]
    malformed = http.post(
        "/datasets", json={"record": {**record, "files": {"/etc/x": {"sha256": "x", "size": -1}}}}
    )
    assert malformed.status_code == 422 and "files./etc/x" in malformed.json()["message"]
    assert http.post("/datasets", json={"record": "nope"}).status_code == 422
    assert http.get(f"/datasets/nobody/{name}").json() == {
        "code": "not-found",
        "message": f"there is no data set nobody/{name}",
    }
    with pytest.raises(NotFoundError, match=f"there is no data set nobody/{name}$"):
        client.download(f"nobody/{name}")
    with pytest.raises(ValueError, match="there is no data set nobody/none"):
        client.publish(Servable.from_function(predict_gap, **meta(f"{name}-m"), trained_on=["nobody/none"]))
    assert http.get("/health").json() == {"status": "ok"}


def test_a_private_data_set_is_not_found_for_others(stack, client, bob, folder, name, tmp_path):
    ref = client.publish_dataset(
        Dataset(name, title="Private scans", authors=["Doe, Jane"], files=[folder / "sub" / "notes.txt"],
                visibility="private")
    )  # fmt: skip
    owner = ref.split("/")[0]
    with pytest.raises(NotFoundError, match=f"there is no servable or data set {owner}/{name}$"):
        bob.describe(f"{owner}/{name}")
    with pytest.raises(NotFoundError, match=f"there is no data set {ref}$"):
        bob.download(ref, to=tmp_path)
    raw = httpx.get(f"{bob.url}/api/v1/datasets/{owner}/{name}/files/notes.txt", headers=bob._http.headers)
    assert raw.status_code == 404 and raw.json()["message"] == f"there is no data set {owner}/{name}"
    assert bob.search(name, kind="dataset") == []
    assert [h["name"] for h in client.search(name, kind="dataset")] == [name]
    with pytest.raises(
        ValueError, match=f"trained_on '{owner}/{name}': there is no data set {owner}/{name}$"
    ):
        bob.publish(Servable.from_function(predict_gap, **meta(f"{name}-m"), trained_on=[f"{owner}/{name}"]))
    out = stack.cli("download", ref, "--to", str(tmp_path / "mine"))  # the owner's CLI still can
    client.share(f"{owner}/{name}", users=["bob"])  # shares are the servables' (one name space)
    assert bob.describe(ref)["record"]["title"] == "Private scans"
    assert out.returncode == 0, out.stderr
