"""The search parameters are defined once (``dlhub.protocol.search``, issue 11, item 2): the REST
route, ``Repository.search``, ``Client.search`` and ``dlhub search`` accept exactly the same
parameters, with the same defaults and bounds, and give the same hits.

The front ends run for real: a SQLite repository, the FastAPI app on uvicorn in a thread, the
Client over HTTP and the click command through its runner.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import socket
import threading
import time

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from dlhub.executor.cli import main as cli_main
from dlhub.executor.client import Client
from dlhub.manager.api import create_app
from dlhub.manager.auth import Authenticator, create_user
from dlhub.manager.repository import SEARCH_FILTER_SQL, Repository
from dlhub.manager.store import make_engine, migrate
from dlhub.protocol.search import FILTERS, LIMIT_MAX, LIMIT_MIN, PARAMS, SearchParameterError, SearchQuery

NAMES = [p.name for p in PARAMS]
CLI_ONLY = {"as_json", "home"}  # the command's own options, not search parameters


def openapi_parameters() -> list[dict]:
    engine = sa.create_engine("sqlite://")
    migrate(engine)
    app = create_app(engine, Repository(engine, _tmp_blobs()), Authenticator(engine, refresh_s=None))
    return app.openapi()["paths"]["/api/v1/servables"]["get"]["parameters"]


def _tmp_blobs():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="dlhub-search-blobs-"))


# ---- one definition, four front ends ------------------------------------------------------------


def test_the_four_front_ends_accept_exactly_the_same_parameters():
    assert [f.name for f in dataclasses.fields(SearchQuery)] == NAMES
    defaults = {p.name: p.default for p in PARAMS}

    # Client.search: the same keywords, in the same order, with the same defaults
    client = inspect.signature(Client.search).parameters
    assert list(client)[1:] == NAMES
    assert {name: client[name].default for name in NAMES} == defaults

    # dlhub search: one argument or option per parameter, mapped by its CLI name
    command = cli_main.commands["search"]
    by_cli = {p.cli_name: p for p in PARAMS}
    cli = [o for o in command.params if o.name not in CLI_ONLY]
    assert [by_cli[o.name].name for o in cli if o.name in by_cli] == NAMES and len(cli) == len(NAMES)
    for option in cli:
        p = by_cli[option.name]
        assert option.default == ((not p.default) if p.cli_inverted else p.default), p.name
    (limit_option,) = [o for o in cli if o.name == "limit"]
    assert (limit_option.type.min, limit_option.type.max) == (LIMIT_MIN, LIMIT_MAX)

    # GET /api/v1/servables: one query parameter per search parameter, mapped by its HTTP name
    by_http = {p.http_name: p for p in PARAMS}
    query = [p for p in openapi_parameters() if p["in"] == "query"]
    assert [by_http[q["name"]].name for q in query if q["name"] in by_http] == NAMES and len(query) == len(
        NAMES
    )
    for q in query:
        p = by_http[q["name"]]
        assert q["schema"].get("default") == p.default, p.name
        assert (q["schema"].get("minimum"), q["schema"].get("maximum")) == (p.minimum, p.maximum), p.name
    assert {q["name"]: q["schema"].get("type") for q in query} == {
        "q": "string",
        "owner": None,  # anyOf string, null
        "domain": None,
        "author": None,
        "related": None,
        "dataset": None,
        "servable": None,
        "only_latest": "boolean",
        "limit": "integer",
        "kind": "string",
    }

    # Repository.search: every parameter as a keyword, and nothing else
    engine = sa.create_engine("sqlite://")
    migrate(engine)
    repo = Repository(engine, _tmp_blobs())
    assert repo.search(**defaults) == []
    with pytest.raises(TypeError, match="nope"):
        repo.search(nope="x")


def test_every_filter_has_its_sql():
    names = {"owner", "domain", "author", "related", "dataset", "servable"}
    assert set(FILTERS) == set(SEARCH_FILTER_SQL) == names


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keywords, parameter",
    [
        ({"limit": 0}, "limit"),
        ({"limit": LIMIT_MAX + 1}, "limit"),
        ({"limit": "5"}, "limit"),
        ({"limit": True}, "limit"),
        ({"owner": 5}, "owner"),
        ({"related": ["10.1/x"]}, "related"),
        ({"only_latest": "yes"}, "only_latest"),
        ({"query": None}, "query"),
    ],
)
def test_a_bad_parameter_is_an_error_naming_it(keywords, parameter):
    with pytest.raises(SearchParameterError, match=f"'{parameter}'") as caught:
        SearchQuery(**keywords)
    assert caught.value.parameter == parameter and isinstance(caught.value, ValueError)


def test_bounds_and_empty_filters():
    assert SearchQuery(limit=LIMIT_MIN).limit == LIMIT_MIN and SearchQuery(limit=LIMIT_MAX).limit == LIMIT_MAX
    q = SearchQuery("x", owner="", domain="vision")
    assert q.owner is None and q.filters() == {"domain": "vision"}


def test_http_parameters_round_trip():
    q = SearchQuery("featurizer", owner="jane", only_latest=False, limit=7)
    params = q.to_params()
    assert params == {
        "q": "featurizer",
        "owner": "jane",
        "only_latest": False,
        "limit": 7,
    }  # unset filters left out
    assert SearchQuery.from_params(params) == q
    with pytest.raises(SearchParameterError, match="'query'.*not a search parameter"):
        SearchQuery.from_params({"query": "x"})  # the HTTP name is q
    assert SearchQuery.from_cli({"query": "", "all_versions": True, "limit": 3}) == SearchQuery(
        only_latest=False, limit=3
    )


def test_the_client_checks_its_parameters_before_any_request():
    client = Client(url="http://127.0.0.1:9", token="t", timeout_s=0.5)  # nothing listens on port 9
    with pytest.raises(SearchParameterError, match="'limit'"):
        client.search(limit=0)
    with pytest.raises(SearchParameterError, match="'owner'"):
        client.search(owner=3)


# ---- the same hits through every front end -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A repository with three ready servables, served over REST; (repository, url, token)."""
    import uvicorn

    tmp = tmp_path_factory.mktemp("search")
    engine = make_engine(f"sqlite:///{tmp / 'dlhub.db'}")
    migrate(engine)
    repo = Repository(engine, tmp / "blobs")
    for owner, name, extra in (
        ("jane", "composition-featurizer", {"domains": ["materials"]}),
        ("jane", "composition-featurizer", {"domains": ["materials"], "title": "Featurizer v2"}),
        ("bob", "image-featurizer", {"domains": ["vision"], "authors": [{"name": "Roe, Bob"}]}),
        ("bob", "doi-model", {"related_identifiers": [{"identifier": "10.1000/xyz"}]}),
    ):
        record = {
            "name": name,
            "title": extra.pop("title", f"The {name} servable"),
            "authors": extra.pop("authors", [{"name": "Doe, Jane"}]),
            "kind": "function",
            "entry_point": "sha256:" + "0" * 64,
            **extra,
        }
        published = repo.publish(owner, record, {})
        repo.mark_ready(owner, name, published.version)
    token = create_user(engine, "reader")
    app = create_app(engine, repo, Authenticator(engine))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield repo, f"http://127.0.0.1:{port}", token, tmp
    server.should_exit = True
    thread.join(10)
    engine.dispose()


SEARCHES = [
    {},
    {"query": "featurizer"},
    {"query": "featurizer", "only_latest": False},
    {"owner": "jane", "only_latest": False},
    {"domain": "vision"},
    {"author": "roe, bob"},
    {"related": "10.1000/xyz"},
    {"query": "featurizer", "limit": 1},
]


@pytest.mark.parametrize(
    "keywords", SEARCHES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "all"
)
def test_every_front_end_gives_the_same_hits(served, keywords):
    repo, url, token, tmp = served
    q = SearchQuery(**keywords)

    def refs(hits):
        return [(h["owner"], h["name"], h["version"]) for h in hits]

    direct = refs(repo.search(q))
    assert direct == refs(repo.search(**keywords))
    assert direct == refs(Client(url, token).search(**keywords))

    home = tmp / "home"
    home.mkdir(exist_ok=True)
    (home / "config.json").write_text(json.dumps({"rest_url": url, "token": token}))
    args = ["search", "--json", "--home", str(home)]
    for p in PARAMS:
        if p.name not in keywords:
            continue
        value = keywords[p.name]
        if p.cli_argument:
            args.append(value)
        elif p.type is bool:
            if value != p.default:
                args.append("--" + p.cli_name.replace("_", "-"))
        else:
            args += ["--" + p.cli_name.replace("_", "-"), str(value)]
    run = CliRunner().invoke(cli_main, args)
    assert run.exit_code == 0, run.output
    assert refs(json.loads(run.output)) == direct
    if keywords:
        assert direct != refs(repo.search())  # each search narrows: a parameter that was dropped shows


def test_a_bad_parameter_is_refused_at_every_front_end(served):
    repo, url, token, tmp = served
    import httpx

    r = httpx.get(
        f"{url}/api/v1/servables",
        params={"limit": LIMIT_MAX + 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 422 and "limit" in r.json()["message"]
    with pytest.raises(ValueError, match="limit"):
        repo.search(limit=0)
    with pytest.raises(ValueError, match="limit"):
        Client(url, token).search(limit=LIMIT_MAX + 1)
    run = CliRunner().invoke(cli_main, ["search", "--limit", "0", "--home", str(tmp)])
    assert run.exit_code == 2 and "--limit" in run.output
