"""The web interface: server-rendered pages (Jinja2) next to the REST API, same port, same tokens.

    browser --cookie session--> SessionCookies (middleware) --> these routes --> the REST handlers
                                                                              (search, describe, run ...)

Pages call the REST route functions of :func:`dlhub.manager.api.create_app` directly (``api``:
its locals), so visibility, sharing and errors are exactly the REST API's. A signed-in browser
holds an opaque session id (HttpOnly, SameSite=Strict); the token stays on the server. Every POST
form carries the session's CSRF token; the middleware turns a web POST with a valid session into
the token's ``Authorization: Bearer`` header, so the REST API's body limits apply unchanged.
Anonymous visitors see public servables only. Readable without JavaScript.
"""

import asyncio
import collections
import hmac
import html
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import sqlalchemy as sa

HERE = Path(__file__).parent
COOKIE = "dlhub_session"
ANONYMOUS = ("", "anonymous")
MAX_SESSIONS = 10_000
SESSION_TTL_S = 12 * 3600
MAX_SIGNIN_BYTES = 4096
PAGE_SIZE = 20
FIGURE_TASKS = 1000  # a servable page's latency figures: its last this many tasks
FIGURE_SCAN_TASKS = 20_000  # ... among the hub's newest this many tasks (SQLite; see servable_figures)
RUN_WAIT_S = 10.0  # the run form waits this long for the result, then shows the task's link


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Sessions:
    """Session id -> (token, csrf, created). In memory: a manager restart signs everyone out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: collections.OrderedDict[str, tuple[str, str, float]] = collections.OrderedDict()

    def create(self, token: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._by_id[sid] = (token, secrets.token_urlsafe(24), time.time())
            while len(self._by_id) > MAX_SESSIONS:
                self._by_id.popitem(last=False)
        return sid

    def get(self, sid: str | None) -> tuple[str, str] | None:
        if not sid:
            return None
        with self._lock:
            found = self._by_id.get(sid)
            if found is None:
                return None
            if time.time() - found[2] > SESSION_TTL_S:
                del self._by_id[sid]
                return None
        return found[0], found[1]

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


def _cookie(scope: dict) -> str | None:
    for key, value in scope["headers"]:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == COOKIE:
                    return v
    return None


class SessionCookies:
    """ASGI middleware (outside the REST API's BoundedBodies): a POST to a web page (not
    ``/api/``) gets its session's token as a Bearer header; one without a session is sent to
    the sign-in page. ``POST /signin`` reads its small form here and checks the token."""

    def __init__(self, app: Any, sessions: Sessions, check_token: Any):
        self.app, self.sessions, self.check_token = app, sessions, check_token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
        if scope["path"] == "/signin":
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_SIGNIN_BYTES:
                    return await _redirect(send, "/signin?error=invalid")
            form = parse_qs(body.decode("utf-8", "replace"))
            token = (form.get("token") or [""])[0].strip()
            who = await asyncio.to_thread(self.check_token, token) if token else None
            if who is None or who[1] == "endpoint":
                return await _redirect(send, "/signin?error=invalid")
            sid = self.sessions.create(token)
            cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict"
            return await _redirect(send, (form.get("next") or ["/"])[0], cookie)
        session = self.sessions.get(_cookie(scope))
        if session is None:
            return await _redirect(send, "/signin?error=expired")
        headers.append((b"authorization", b"Bearer " + session[0].encode("latin-1")))
        await self.app({**scope, "headers": headers}, receive, send)


async def _redirect(send: Any, location: str, cookie: str | None = None) -> None:
    if not location.startswith("/") or location.startswith("//"):
        location = "/"  # no open redirects
    headers = [(b"location", location.encode("latin-1", "replace")), (b"content-length", b"0")]
    if cookie:
        headers.append((b"set-cookie", cookie.encode("latin-1")))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


# ---- presentation helpers ----------------------------------------------------------------------


_BIBTEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
    "\\": r"\textbackslash{}",
}


def bibtex_text(value: str) -> str:
    """A value safe inside BibTeX braces: LaTeX's special characters escaped."""
    return "".join(_BIBTEX_SPECIAL.get(c, c) for c in value)


def bibtex(record: dict, year: int | None = None, url: str | None = None) -> str:
    key = f"{record.get('owner')}_{record.get('name')}_v{record.get('version')}"
    key = "".join(c if c.isalnum() or c in "_:" else "_" for c in key)
    authors = " and ".join(a["name"] for a in record.get("authors", []))
    fields = {
        "title": record.get("title", ""),
        "author": authors,
        "publisher": "DLHub",
        "version": str(record.get("version") or ""),
        "note": f"servable {record.get('owner')}/{record.get('name')}",
    }
    if year:
        fields["year"] = str(year)
    dois = [r["identifier"] for r in record.get("related_identifiers", []) if r.get("type") == "DOI"]
    if dois:
        fields["doi"] = dois[0]
    if url:
        fields["url"] = url
    body = ",\n".join(
        f"  {k} = {{{bibtex_text(v) if k not in ('url', 'doi') else v}}}" for k, v in fields.items()
    )
    return f"@misc{{{key},\n{body}\n}}"


def datacite(record: dict, year: int | None = None, url: str | None = None) -> dict:
    return {
        **({"url": url} if url else {}),
        "types": {"resourceTypeGeneral": "Software", "resourceType": "Servable"},
        "titles": [{"title": record.get("title", "")}],
        "creators": [
            {
                "name": a["name"],
                "nameType": "Personal",
                **({"affiliation": [a["affiliation"]]} if a.get("affiliation") else {}),
                **(
                    {"nameIdentifiers": [{"nameIdentifier": a["orcid"], "nameIdentifierScheme": "ORCID"}]}
                    if a.get("orcid")
                    else {}
                ),
            }
            for a in record.get("authors", [])
        ],
        "publisher": "DLHub",
        **({"publicationYear": str(year)} if year else {}),
        "version": str(record.get("version") or ""),
        "descriptions": [{"description": record.get("description", ""), "descriptionType": "Abstract"}]
        if record.get("description")
        else [],
        "subjects": [{"subject": d} for d in record.get("domains", []) + record.get("keywords", [])],
        "rightsList": [{"rights": record["license"]}] if record.get("license") else [],
        "relatedIdentifiers": [
            {
                "relatedIdentifier": r["identifier"],
                "relatedIdentifierType": r["type"],
                "relationType": r["relation"],
            }
            for r in record.get("related_identifiers", [])
        ],
    }


def identifier_url(rel: dict) -> str | None:
    ident, kind = rel["identifier"], rel["type"]
    if kind == "DOI":
        return f"https://doi.org/{ident}"
    if kind == "arXiv":
        return f"https://arxiv.org/abs/{ident}"
    if kind == "Handle":
        return f"https://hdl.handle.net/{ident}"
    if kind == "URL" and ident.startswith(("http://", "https://")):
        return ident
    return None


def snippets(ref: str, example: dict | None, rest_url: str) -> dict[str, str]:
    args = (example or {}).get("args", [])
    kwargs = (example or {}).get("kwargs", {})
    py_args = "".join(f", {a!r}" for a in args) + "".join(f", {k}={v!r}" for k, v in kwargs.items())
    body = json.dumps({"args": args, "kwargs": kwargs})
    cli_args = " ".join("'" + json.dumps(a).replace("'", "'\\''") + "'" for a in args)
    owner, name = ref.split("/", 1)
    return {
        "Python": f"from dlhub.executor import Executor\n\nwith Executor() as ex:\n"
        f'    print(ex.submit("{ref}"{py_args}).result())',
        "CLI": f"dlhub run {ref} {cli_args}".rstrip(),
        "curl": f'curl -H "Authorization: Bearer $DLHUB_TOKEN" -H "Content-Type: application/json" \\\n'
        f"  -d '{body}' \\\n  {rest_url}/api/v1/servables/{owner}/{name}/run",
    }


def svg_bars(values: list[tuple[str, float]], unit: str = "", width: int = 320, height: int = 120) -> str:
    """A small bar chart as inline SVG (server-side, no script); labelled for screen readers."""
    if not values:
        return ""
    top = max(v for _, v in values) or 1.0
    bar = width / len(values)
    pad = 16  # room for the value above the tallest bar
    parts = [
        f'<svg class="plot" viewBox="0 -{pad} {width} {height + 30 + pad}" width="{width}" '
        f'height="{height + 30 + pad}" '
        f'role="img" aria-label="{html.escape(", ".join(f"{k}: {v:g}{unit}" for k, v in values))}">'
    ]
    for i, (label, value) in enumerate(values):
        h = max(1.0, value / top * height)
        x = i * bar + bar * 0.15
        parts.append(
            f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar * 0.7:.1f}" height="{h:.1f}"></rect>'
            f'<text x="{x + bar * 0.35:.1f}" y="{height - h - 3:.1f}" text-anchor="middle">{value:g}</text>'
            f'<text x="{x + bar * 0.35:.1f}" y="{height + 16}" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_lines(
    series: dict[str, list[tuple[float, float]]], now: float, width: int = 480, height: int = 120
) -> str:
    """Lines of (time, value) points over the last minutes (each series scaled to its own
    maximum, which its legend gives), inline SVG with a text alternative."""
    points = [p for ps in series.values() for p in ps]
    if not points:
        return ""
    t0 = min(t for t, _ in points)
    span = max(20.0, now - t0)
    ago = f"{span:.0f} s" if span < 120 else f"{span / 60:.1f} min"
    label = "; ".join(
        f"{k}: now {ps[-1][1]:g}, max {max(v for _, v in ps):g} over the last {ago}"
        for k, ps in series.items()
        if ps
    )
    parts = [
        f'<svg class="plot" viewBox="0 0 {width} {height + 50}" width="{width}" height="{height + 50}" '
        f'role="img" aria-label="{html.escape(label)}">'
    ]
    for i, (name, ps) in enumerate(series.items()):
        top = max((v for _, v in ps), default=0) or 1.0
        coords = " ".join(
            f"{(t - (now - span)) / span * width:.1f},{4 + (height - 4) * (1 - v / top):.1f}" for t, v in ps
        )
        if ps:
            parts.append(f'<polyline class="s{i}" fill="none" points="{coords}"></polyline>')
            x, y = coords.rsplit(" ", 1)[-1].split(",")
            parts.append(f'<circle class="s{i}" cx="{x}" cy="{y}" r="3"></circle>')  # the latest
        peak = max((v for _, v in ps), default=0)
        legend = html.escape(f"{name}: now {ps[-1][1]:g}, max {peak:g}" if ps else name)
        parts.append(f'<text class="s{i}" x="4" y="{height + 30 + 14 * i}">{legend}</text>')
    parts.append(
        f'<text x="2" y="{height + 14}">−{ago}</text>'
        f'<text x="{width - 2}" y="{height + 14}" text-anchor="end">now</text></svg>'
    )
    return "".join(parts)


LATENCY_BUCKETS = [  # (upper bound in ms, label)
    (1.0, "<1 ms"),
    (10.0, "1-10 ms"),
    (100.0, "10-100 ms"),
    (1000.0, "0.1-1 s"),
    (10_000.0, "1-10 s"),
    (float("inf"), ">10 s"),
]


def latency_histogram(latencies_ms: list[float]) -> list[tuple[str, float]]:
    """Calls per decade of latency, from the first bucket with calls to the last (at least 3)."""
    counts = [0] * len(LATENCY_BUCKETS)
    for ms in latencies_ms:
        counts[next(i for i, (top, _) in enumerate(LATENCY_BUCKETS) if ms < top)] += 1
    used = [i for i, n in enumerate(counts) if n]
    if not used:
        return []
    first, last = used[0], max(used[-1], min(len(counts) - 1, used[0] + 2))
    return [(LATENCY_BUCKETS[i][1], counts[i]) for i in range(first, last + 1)]


def summarize(value: Any, depth: int = 0) -> Any:
    """Large nested lists (numpy arrays as JSON) shown as shape + first items."""
    if isinstance(value, list) and len(value) > 20:
        shape = [len(value)]
        inner = value[0] if value else None
        while isinstance(inner, list):
            shape.append(len(inner))
            inner = inner[0] if inner else None
        return {
            "shape": shape,
            "first": value[:5],
            "note": "summarized: showing the first 5 of the first axis",
        }
    if isinstance(value, dict) and depth < 3:
        return {k: summarize(v, depth + 1) for k, v in value.items()}
    return value


def version_mismatches(manager: dict, endpoint: dict) -> list[str]:
    """Runtime versions (python, dill) an endpoint reports that differ from the manager's: code
    serialized on one side may not load on the other."""
    return [
        f"{key}: endpoint {endpoint[key]}, manager {manager[key]}"
        for key in sorted(manager)
        if key in endpoint and endpoint[key] != manager[key]
    ]


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "—"


class History:
    """Manager-wide figures sampled from ``Manager.status()`` (asked of the loop) for the endpoints
    page's plot: each view and live update adds a sample, and while someone looked at the page in
    the last ``IDLE_S`` a thread adds one every ``SAMPLE_S``, so the plot shows the last minutes
    rather than only the time the page was open. Samples older than ``KEEP_S`` are dropped."""

    SAMPLE_S = 5.0
    IDLE_S = 900.0
    KEEP_S = 600.0

    def __init__(self) -> None:
        self.samples: collections.deque = collections.deque(maxlen=2000)
        self.lock = threading.Lock()
        self.last_view = 0.0
        self.sampler: threading.Thread | None = None

    def add(self, status: dict, now: float | None = None) -> None:
        now = time.time() if now is None else now
        row = {"t": now, "done": status.get("finished", 0) or 0}
        row["queue"] = sum(
            e.get("pending", 0) + e.get("held", 0) + e.get("inflight", 0)
            for e in status["endpoints"].values()
        )
        with self.lock:
            if self.samples and now - self.samples[-1]["t"] < 1.0:
                self.samples[-1] = row
            else:
                self.samples.append(row)
            while self.samples and now - self.samples[0]["t"] > self.KEEP_S:
                self.samples.popleft()

    def watch(self, sample: Any, alive: Any) -> None:
        """A page view: keep (or start) sampling with ``sample()`` (a status snapshot) while
        ``alive()`` (the manager runs)."""
        with self.lock:
            self.last_view = time.time()
            if self.sampler is not None and self.sampler.is_alive():
                return
            self.sampler = threading.Thread(
                target=self._run, args=(sample, alive), name="dlhub-web-history", daemon=True
            )
            self.sampler.start()

    def _run(self, sample: Any, alive: Any) -> None:
        while time.time() - self.last_view < self.IDLE_S:
            time.sleep(self.SAMPLE_S)
            if not alive():
                return
            with self.lock:
                fresh = self.samples and time.time() - self.samples[-1]["t"] < self.SAMPLE_S * 0.8
            if fresh:
                continue
            try:
                self.add(sample())
            except Exception:  # the manager stopped (its loop does not answer): stop sampling
                return

    def series(self) -> dict[str, list[tuple[float, float]]]:
        with self.lock:
            rows = list(self.samples)
        throughput = [
            (b["t"], round(max(0.0, (b["done"] - a["done"]) / max(1e-3, b["t"] - a["t"])), 2))
            for a, b in zip(rows, rows[1:])
        ]
        return {"throughput (tasks/s)": throughput, "queue depth": [(r["t"], r["queue"]) for r in rows]}


def offline_docs(app: Any) -> None:
    """/docs and /redoc with swagger-ui and redoc served from the package fastapi-offline (MIT),
    not FastAPI's default CDN: login nodes and air-gapped sites have no internet."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    cdn = ("/docs", "/redoc")
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in cdn]
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    redoc_js: list[bytes] = []

    @app.get("/docs-redoc.js", include_in_schema=False)
    def redoc_script():
        """redoc's bundle with its one off-host URL (the "powered by" logo) made local."""
        from fastapi.responses import Response

        if not redoc_js:
            text = (assets / "redoc.standalone.js").read_bytes()
            logo = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
            redoc_js.append(text.replace(logo, b"/docs-assets/favicon.png"))
        return Response(redoc_js[0], media_type="application/javascript")

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            redoc_js_url="/docs-redoc.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )


# ---- the routes --------------------------------------------------------------------------------


def install(app: Any, api: dict[str, Any]) -> None:
    """Mount the pages on ``app``. ``api``: ``create_app``'s locals (the REST handlers and the
    ``engine``, ``repository``, ``auth``, ``servables`` they close over)."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from dlhub.protocol.search import SearchParameterError, SearchQuery

    from ..repository import NotFound
    from ..store import tasks_table

    engine, auth, servables = api["engine"], api["auth"], api["servables"]
    ApiError = api["ApiError"]  # passed in: importing dlhub.manager.api here would be an import cycle
    sessions = Sessions()
    history = History()
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
    env.filters["when"] = when
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=False, default=str)
    env.globals["identifier_url"] = identifier_url

    app.add_middleware(SessionCookies, sessions=sessions, check_token=auth.check)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="web-static")
    offline_docs(app)

    def who_of(request: Request) -> tuple[tuple[str, str], str | None]:
        """(user, role) of the session (anonymous without one), and its CSRF token."""
        session = sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            who = auth.check(session[0])  # each request: a revoked token signs the browser out
            if who is not None and who[1] != "endpoint":
                return who, session[1]
        return ANONYMOUS, None

    def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        who, csrf = who_of(request)
        text = env.get_template(template).render(
            request=request, user=who[0] or None, role=who[1], csrf=csrf, path=request.url.path, **context
        )
        return HTMLResponse(text, status_code=status)

    def error_page(request: Request, status: int, code: str, message: str) -> HTMLResponse:
        return render(request, "error.html", status=status, code=code, message=message)

    async def checked_form(request: Request) -> dict[str, str]:
        """The POSTed form, after its CSRF token matched the session's (else ApiError 403)."""
        form = await request.form()
        _, csrf = who_of(request)
        sent = form.get("csrf")
        if csrf is None or not isinstance(sent, str) or not hmac.compare_digest(sent, csrf):
            raise ApiError(403, "csrf", "the form's CSRF token does not match this session; reload the page")
        return {k: v for k, v in form.items() if isinstance(v, str)}

    # ---- sign in / out

    @app.get("/signin", response_class=HTMLResponse, include_in_schema=False)
    def signin_page(request: Request, error: str | None = None, next: str = "/"):
        messages = {"invalid": "That token is not valid.", "expired": "Please sign in again."}
        return render(request, "signin.html", error=messages.get(error or ""), next=next)

    @app.post("/signout", include_in_schema=False)
    async def signout(request: Request):
        await checked_form(request)
        sessions.drop(request.cookies.get(COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # ---- search

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page(
        request: Request,
        q: str = "",
        domain: str = "",
        author: str = "",
        owner: str = "",
        page: int = 1,
        per: int = PAGE_SIZE,
    ):
        who, _ = who_of(request)
        per = max(1, min(per, 100))
        page = max(1, min(page, 500 // per))
        try:
            query = SearchQuery(
                query=q, domain=domain, author=author, owner=owner, limit=min(500, page * per + 1)
            )
        except SearchParameterError as exc:
            return error_page(request, 422, "invalid-request", str(exc))
        hits = api["search"](query, who)["results"]
        shown = hits[(page - 1) * per : page * per]
        if who[0] and shown:  # a signed-in viewer may see private ones: say which
            from ..schema import access_table as a

            pairs = [(h["owner"], h["name"]) for h in shown]
            with engine.connect() as conn:
                private = set(
                    conn.execute(
                        sa.select(a.c.owner, a.c.name).where(
                            a.c.visibility == "private", sa.tuple_(a.c.owner, a.c.name).in_(pairs)
                        )
                    ).all()
                )
            shown = [
                {**h, "visibility": "private"} if (h["owner"], h["name"]) in private else h for h in shown
            ]
        base = {k: v for k, v in {"q": q, "domain": domain, "author": author, "owner": owner}.items() if v}
        if per != PAGE_SIZE:
            base["per"] = str(per)
        prev_url = f"/?{urlencode({**base, 'page': page - 1})}" if page > 1 else None
        next_url = f"/?{urlencode({**base, 'page': page + 1})}" if len(hits) > page * per else None
        return render(
            request,
            "search.html",
            hits=shown,
            q=q,
            domain=domain,
            author=author,
            owner=owner,
            page=page,
            first=(page - 1) * per + 1,
            prev_url=prev_url,
            next_url=next_url,
        )

    # ---- a servable

    def servable_figures(ref: str, who: tuple[str, str]) -> dict[str, Any]:
        """Calls and latency (the last ``FIGURE_TASKS`` tasks that named this servable), and the
        endpoints' per-servable counts (batches, output cache) from ``Manager.status()``."""
        from dlhub.protocol import messages as m

        from ..schema import versions_table

        t, v = tasks_table, versions_table
        owner, name = ref.split("/", 1)
        digests = sa.select(m.RUN_PREFIX + v.c.digest).where(v.c.owner == owner, v.c.name == name)
        # latency from started (else received) to finished, computed by the database (null
        # while running); rows read as tuples: a Row's attribute access costs more than the query
        latency = (t.c.t_finished - sa.func.coalesce(t.c.t_started, t.c.t_received)) * 1000.0
        where = t.c.function.in_(digests)
        if engine.dialect.name == "sqlite":
            # tasks has no index on function (one would slow every task's insert): look only at
            # the hub's newest FIGURE_SCAN_TASKS rows (a rowid range), so the page's time does not
            # grow with the task history
            rowid = sa.literal_column("tasks.rowid")
            newest = sa.select(sa.func.max(rowid)).select_from(t).scalar_subquery()
            where = sa.and_(rowid > newest - FIGURE_SCAN_TASKS, where)
        with engine.connect() as conn:
            rows = [
                tuple(r)
                for r in conn.execute(
                    sa.select(latency, t.c.state)
                    .where(where)
                    .order_by(t.c.t_received.desc())
                    .limit(FIGURE_TASKS)
                )
            ]
        latencies = sorted(ms for ms, _ in rows if ms is not None)
        figures: dict[str, Any] = {
            "calls": len(rows),
            "failed": sum(1 for _, state in rows if state in ("failed", "timeout", "lost")),
            "p50_ms": round(_quantile(latencies, 0.5), 2) if latencies else None,
            "p99_ms": round(_quantile(latencies, 0.99), 2) if latencies else None,
        }
        hits = misses = batches = batched = 0
        if servables is not None:
            try:
                status = servables.visible_status(servables.status(), api["viewer_of"](who))
            except Exception:
                status = {"endpoints": {}}
            for ep in status.get("endpoints", {}).values():
                for label, per in ((ep.get("info") or {}).get("servables") or {}).items():
                    if label.split(":")[0] == ref and isinstance(per, dict):
                        hits += per.get("output_cache_hits", 0) or 0
                        misses += per.get("output_cache_misses", 0) or 0
                        batches += per.get("batches", 0) or 0
                        batched += per.get("batched_calls", 0) or 0
        figures["cache_hit_rate"] = round(hits / (hits + misses), 3) if hits + misses else None
        figures["mean_batch"] = round(batched / batches, 2) if batches else None
        figures["plot"] = svg_bars(latency_histogram(latencies), unit=" calls") if latencies else ""
        return figures

    def servable_view(request: Request, owner: str, name: str, version: int | None, **extra: Any):
        who, _ = who_of(request)
        try:
            described = api["describe"](who, owner, name, version)
        except NotFound as exc:
            return error_page(request, 404, "not-found", str(exc))
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        record = described["record"]
        ref = f"{owner}/{name}"
        example = record["examples"][0] if record.get("examples") else None
        inputs = json.dumps(
            {"args": example["args"], "kwargs": example["kwargs"]} if example else {"args": [], "kwargs": {}}
        )
        endpoints: list[str] = []
        if servables is not None:
            try:
                endpoints = sorted(n for n, up in servables.manager.endpoints_connected().items() if up)
            except Exception:
                endpoints = []
        rest_url = str(request.base_url).rstrip("/")
        page_url = f"{rest_url}/servables/{owner}/{name}/{record['version']}"
        created = next(
            (v.get("created") for v in described["versions"] if v["version"] == record["version"]), None
        )
        year = time.gmtime(created).tm_year if created else None
        return render(
            request,
            "servable.html",
            ref=ref,
            owner=owner,
            name=name,
            d=described,
            r=record,
            bibtex=bibtex(record, year, page_url),
            datacite=json.dumps(datacite(record, year, page_url), indent=2),
            snippets=snippets(ref + (f":{version}" if version else ""), example, rest_url),
            figures=servable_figures(ref, who),
            inputs=extra.pop("inputs", inputs),
            endpoints=endpoints,
            may_change=who[1] == "admin" or (who[0] and who[0] == owner),
            run_wait_s=RUN_WAIT_S,
            **extra,
        )

    @app.get("/servables/{owner}/{name}", response_class=HTMLResponse, include_in_schema=False)
    def servable_page(request: Request, owner: str, name: str):
        return servable_view(request, owner, name, None)

    @app.get("/servables/{owner}/{name}/{version}", response_class=HTMLResponse, include_in_schema=False)
    def servable_version_page(request: Request, owner: str, name: str, version: int):
        if not 1 <= version <= 2**62:
            return error_page(request, 404, "not-found", f"there is no version {version}")
        return servable_view(request, owner, name, version)

    @app.post("/servables/{owner}/{name}/run", response_class=HTMLResponse, include_in_schema=False)
    async def run_form(request: Request, owner: str, name: str):
        try:
            form = await checked_form(request)
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        who, _ = who_of(request)
        raw = form.get("inputs", "")
        version = int(form["version"]) if form.get("version", "").isdigit() else None
        outcome: dict[str, Any]
        try:
            inputs = json.loads(raw or "{}")
            if not isinstance(inputs, dict):
                raise ValueError('inputs must be a JSON object {"args": [...], "kwargs": {...}}')
            args, kwargs = inputs.get("args", []), inputs.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ValueError("'args' must be a JSON list and 'kwargs' a JSON object")
        except ValueError as exc:
            outcome = {"status": 422, "body": {"code": "invalid-request", "message": f"inputs: {exc}"}}
        else:
            try:
                response = await api["run"](
                    who=who,
                    owner=owner,
                    name=name,
                    args=args,
                    kwargs=kwargs,
                    version=version,
                    endpoint=form.get("endpoint") or None,
                    wait_s=RUN_WAIT_S,
                    timeout_s=None,
                    cache=True,
                )
                outcome = {"status": response.status_code, "body": json.loads(response.body)}
            except ApiError as exc:
                outcome = {
                    "status": exc.status,
                    "body": {"code": exc.code, "message": exc.message, **exc.extra},
                }
        body = outcome["body"]
        if "result" in body:
            body = {**body, "result": summarize(body["result"])}
        outcome["body"] = body
        return servable_view(
            request,
            owner,
            name,
            version,
            outcome=outcome,
            inputs=raw,
            status=200 if outcome["status"] < 500 else 502,
        )

    @app.get(
        "/servables/{owner}/{name}/{version}/delete", response_class=HTMLResponse, include_in_schema=False
    )
    def delete_page(request: Request, owner: str, name: str, version: int):
        """Asks before deleting (a page, not a script dialog: works without JavaScript)."""
        who, _ = who_of(request)
        if not who[0]:
            return RedirectResponse(f"/signin?next=/servables/{owner}/{name}", status_code=303)
        try:
            described = api["describe"](who, owner, name, None)
        except NotFound as exc:
            return error_page(request, 404, "not-found", str(exc))
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        if not (who[1] == "admin" or who[0] == owner):
            return error_page(
                request, 403, "forbidden", f"only {owner} (or an admin) may delete its versions"
            )
        row = next((v for v in described["versions"] if v["version"] == version), None)
        if row is None or row["status"] == "deleted":
            return error_page(request, 404, "not-found", f"{owner}/{name} has no version {version} to delete")
        return render(
            request, "delete.html", owner=owner, name=name, v=row, title=described["record"]["title"]
        )

    @app.post("/servables/{owner}/{name}/{version}/delete", include_in_schema=False)
    async def delete_form(request: Request, owner: str, name: str, version: int):
        who, _ = who_of(request)
        try:
            await checked_form(request)
            api["delete_version"](who, owner, name, version)
        except NotFound as exc:
            return error_page(request, 404, "not-found", str(exc))
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        return RedirectResponse(f"/servables/{owner}/{name}", status_code=303)

    @app.post("/servables/{owner}/{name}/share", include_in_schema=False)
    async def share_form(request: Request, owner: str, name: str):
        who, _ = who_of(request)
        try:
            form = await checked_form(request)
            users = [u.strip() for u in form.get("users", "").split(",") if u.strip()]
            groups = [g.strip() for g in form.get("groups", "").split(",") if g.strip()]
            call = api["unshare"] if form.get("action") == "unshare" else api["share"]
            if users or groups:
                call(who, owner, name, users, groups)
            if form.get("visibility") in ("public", "private"):
                api["set_visibility"](who, owner, name, form["visibility"])
        except NotFound as exc:
            return error_page(request, 404, "not-found", str(exc))
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        return RedirectResponse(f"/servables/{owner}/{name}", status_code=303)

    # ---- tasks

    @app.get("/tasks", response_class=HTMLResponse, include_in_schema=False)
    def tasks_page(request: Request):
        who, _ = who_of(request)
        if not who[0]:
            return RedirectResponse("/signin?next=/tasks", status_code=303)
        from dlhub.protocol import messages as m

        from ..schema import versions_table as v

        t = tasks_table
        query = sa.select(t.c.task_id, t.c.function, t.c.state, t.c.endpoint, t.c.t_received, t.c.t_finished)
        with engine.connect() as conn:
            rows = conn.execute(
                query.where(t.c.owner == who[0]).order_by(t.c.t_received.desc()).limit(50)
            ).all()
            # the servable each call named (its tasks carry the version's digest)
            digests = {r.function[len(m.RUN_PREFIX) :] for r in rows if r.function.startswith(m.RUN_PREFIX)}
            named = {
                d: (o, n, ver)
                for d, o, n, ver in conn.execute(
                    sa.select(v.c.digest, v.c.owner, v.c.name, v.c.version).where(v.c.digest.in_(digests))
                )
            }
        tasks = [
            {
                **r._mapping,
                "task_id": r.task_id.hex(),
                "servable": named.get(r.function[len(m.RUN_PREFIX) :])
                if r.function.startswith(m.RUN_PREFIX)
                else None,
            }
            for r in rows
        ]
        return render(request, "tasks.html", tasks=tasks)

    @app.get("/tasks/{task_id}", response_class=HTMLResponse, include_in_schema=False)
    def task_page(request: Request, task_id: str):
        who, _ = who_of(request)
        if not who[0]:
            return RedirectResponse(f"/signin?next=/tasks/{task_id}", status_code=303)
        try:
            task = api["task"](who, task_id)
            result = api["task_result"](who, task_id)
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        body = json.loads(result.body)
        if "result" in body:
            body["result"] = summarize(body["result"])
        refresh = task["state"] not in ("succeeded", "failed", "cancelled", "lost", "timeout")
        steps = [
            ("received", task.get("t_received")),
            ("sent to the endpoint", task.get("t_dispatched")),
            ("started on a worker", task.get("t_started")),
            ("finished", task.get("t_finished")),
        ]
        return render(
            request,
            "task.html",
            task=task,
            outcome={"status": result.status_code, "body": body},
            refresh=refresh,
            steps=steps,
            elapsed=time.time() - (task.get("t_received") or time.time()),
        )

    # ---- endpoints

    def endpoints_status(who: tuple[str, str]) -> dict[str, Any]:
        if servables is None:
            raise ApiError(503, "unavailable", "this server has no manager behind it")
        status = servables.status()  # asked of the loop, which owns the Router
        history.add(status)
        stop = getattr(servables.manager, "_stop", None)  # the Manager's: set once it stops
        history.watch(servables.status, lambda: stop is None or not stop.is_set())
        mine = (status.get("manager") or {}).get("versions") or {}
        for e in status["endpoints"].values():  # each a fresh dict (its "info" is the Router's)
            e["mismatches"] = version_mismatches(mine, e.get("versions") or {})
        return servables.visible_status(status, api["viewer_of"](who)) if who[0] else _public_status(status)

    def _public_status(status: dict) -> dict:
        return {
            "endpoints": {
                n: {
                    k: e.get(k)
                    for k in (
                        "connected",
                        "last_seen_s_ago",
                        "pending",
                        "held",
                        "inflight",
                        "versions",
                        "mismatches",
                        "info",
                    )
                }
                for n, e in status["endpoints"].items()
            },
            "tasks_open": status.get("tasks_open"),
        }

    @app.get("/endpoints", response_class=HTMLResponse, include_in_schema=False)
    async def endpoints_page(request: Request):
        who, _ = who_of(request)
        try:
            status = await asyncio.to_thread(endpoints_status, who)
        except ApiError as exc:
            return error_page(request, exc.status, exc.code, exc.message)
        return render(
            request, "endpoints.html", snapshot=status, plot=svg_lines(history.series(), time.time())
        )

    @app.get("/endpoints.json", include_in_schema=False)
    async def endpoints_json(request: Request):
        who, _ = who_of(request)
        status = await asyncio.to_thread(endpoints_status, who)
        fragment = env.get_template("endpoints_body.html").render(
            snapshot=status, plot=svg_lines(history.series(), time.time())
        )
        return JSONResponse({"status": json.loads(json.dumps(status, default=str)), "html": fragment})
