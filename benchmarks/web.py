"""Server time of the web interface's servable page with many servables in the database (issue 14:
under 50 ms with 10,000), with the REST describe of the same servable as the baseline, measured in
the same run in alternating rounds.

    .venv/bin/python benchmarks/web.py             # 10,000 servables, 500 requests of each page
    .venv/bin/python benchmarks/web.py --quick     # 1,000 servables, 100 requests each

Server time: from the ASGI call into the app to the last byte of its response (the same app the
manager serves, on a SQLite database whose task history is 100,000 tasks of other servables, 10,000
with --quick, then 4,000 more of which 2,000 named the page's servable), without the HTTP client.
Output: one JSON line per measurement, then a summary line. Every
response is checked (200, the page's title); a wrong one exits 1.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

FULL = {"servables": 10_000, "requests": 500, "history": 100_000}
QUICK = {"servables": 1_000, "requests": 100, "history": 10_000}
TARGET_MS = 50.0


def build(n: int, folder: Path, history: int = 0):
    import sqlalchemy as sa

    from dlhub.manager.api import create_app
    from dlhub.manager.auth import Authenticator, create_user
    from dlhub.manager.repository import Repository
    from dlhub.manager.store import make_engine, migrate, tasks_table
    from dlhub.protocol import messages as m

    engine = make_engine(f"sqlite:///{folder / 'db.sqlite'}")
    migrate(engine)
    repo = Repository(engine, folder / "blobs")
    domains = ["materials science", "chemistry", "biology", "physics", "climate"]
    for i in range(n):
        record = {
            "name": f"model-{i:05d}",
            "title": f"Model {i} predicts property {i % 97}",
            "description": f"A servable for benchmark {i}. It predicts things.",
            "authors": [{"name": f"Author{i % 50}, Given"}],
            "domains": [domains[i % len(domains)]],
            "kind": "function",
            "entry_point": "sha256:" + f"{i:064x}",
            "examples": [{"args": [i, 2], "output": i + 2}],
            "related_identifiers": [{"identifier": f"10.1234/bench.{i}"}],
        }
        published = repo.publish(f"user{i % 100}", record, {})
        repo.mark_ready(f"user{i % 100}", record["name"], published.version)
    owner, name = "user42", "model-00042"
    token = create_user(engine, "reader")
    with engine.connect() as conn:
        digest = conn.execute(
            sa.text("SELECT digest FROM servable_versions WHERE owner = :o AND name = :n"),
            {"o": owner, "n": name},
        ).scalar()
    now = time.time()
    older = [  # a hub's task history: other servables' calls, before the page's servable's
        {
            "task_id": os.urandom(16),
            "owner": "reader",
            "client_session": "bench",
            "endpoint": "local",
            "function": "sha256:" + "e" * 64,
            "state": "succeeded",
            "result_serializer": "json",
            "t_received": now - 100 + i * 1e-4,
            "t_started": now - 100 + i * 1e-4,
            "t_finished": now - 100 + i * 1e-4 + 0.001,
        }
        for i in range(history)
    ]
    rows = older + [
        {
            "task_id": os.urandom(16),
            "owner": "reader",
            "client_session": "bench",
            "endpoint": "local",
            "function": m.RUN_PREFIX + digest if i % 2 else "sha256:" + "f" * 64,
            "state": "succeeded",
            "result_serializer": "json",
            "t_received": now - 10 + i * 0.001,
            "t_started": now - 10 + i * 0.001 + 0.0001,
            "t_finished": now - 10 + i * 0.001 + 0.002,
        }
        for i in range(4000)
    ]
    with engine.begin() as conn:
        conn.execute(tasks_table.insert(), rows)
    app = create_app(engine, repo, Authenticator(engine))
    return app, token, owner, name


async def timed(app, path: str, headers: dict[str, str]) -> tuple[float, int, bytes]:
    """(server seconds, status, body) of one GET through the ASGI app."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()] + [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    start = time.perf_counter()
    await app(scope, receive, send)
    elapsed = time.perf_counter() - start
    status = next(msg["status"] for msg in sent if msg["type"] == "http.response.start")
    body = b"".join(msg.get("body", b"") for msg in sent if msg["type"] == "http.response.body")
    return elapsed, status, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    options = QUICK if parser.parse_args().quick else FULL
    with tempfile.TemporaryDirectory(prefix="dlhub-bench-web-") as tmp:
        t0 = time.perf_counter()
        app, token, owner, name = build(options["servables"], Path(tmp), options["history"])
        print(json.dumps({"setup_s": round(time.perf_counter() - t0, 1), **options}), flush=True)
        pages = {
            "web servable page": (f"/servables/{owner}/{name}", {}, b"Model 42 predicts"),
            "REST describe (baseline)": (
                f"/api/v1/servables/{owner}/{name}",
                {"Authorization": f"Bearer {token}"},
                b"Model 42 predicts",
            ),
        }

        async def run() -> dict[str, list[float]]:
            times: dict[str, list[float]] = {k: [] for k in pages}
            for _ in range(10):  # warm-up: templates compiled, caches filled
                for path, headers, _ in pages.values():
                    await timed(app, path, headers)
            for _ in range(options["requests"] // 10):
                for label, (path, headers, expect) in pages.items():
                    for _ in range(10):
                        seconds, status, body = await timed(app, path, headers)
                        if status != 200 or expect not in body:
                            raise SystemExit(f"{label}: {status} {body[:200]!r}")
                        times[label].append(seconds * 1000)
            return times

        times = asyncio.run(run())
    summary = {}
    for label, values in times.items():
        values.sort()
        record = {
            "measurement": label,
            "servables": options["servables"],
            "requests": len(values),
            "p50_ms": round(statistics.median(values), 2),
            "p99_ms": round(values[int(0.99 * (len(values) - 1))], 2),
            "mean_ms": round(statistics.fmean(values), 2),
        }
        summary[label] = record
        print(json.dumps(record), flush=True)
    page = summary["web servable page"]
    base = summary["REST describe (baseline)"]
    print(
        json.dumps(
            {
                "summary": "servable page server time",
                "p50_ms": page["p50_ms"],
                "p99_ms": page["p99_ms"],
                "baseline_p50_ms": base["p50_ms"],
                "page_over_baseline": round(page["p50_ms"] / base["p50_ms"], 2),
                "target_ms": TARGET_MS,
                "meets_target": page["p99_ms"] < TARGET_MS,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
