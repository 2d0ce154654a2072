"""The REST and Globus Compute APIs answer a kept-alive connection's second request at once
(issue 13, item 4 of the benchmark): their listening socket names IPPROTO_TCP, so asyncio sets
TCP_NODELAY on each accepted connection. Without it uvicorn's head and body writes met Nagle and
the client's delayed ACK: ~44 ms for every request after the first on a connection."""

from __future__ import annotations

import http.client
import statistics
import time

from fastapi import FastAPI

from dlhub.manager.api import ApiServer


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v")
    def version() -> str:
        return "1.0.0"

    return app


def test_requests_on_a_kept_alive_connection_are_not_delayed():
    server = ApiServer(make_app)
    server.start()
    try:
        assert server.ready.wait(10)
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            conn.request("GET", "/v")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b'"1.0.0"'
            times.append(time.perf_counter() - t0)
        conn.close()
        # the first request opens the connection; the rest reuse it (44 ms each before the fix)
        assert statistics.median(times[1:]) < 0.02, [round(t * 1e3, 1) for t in times]
    finally:
        server.stop()
