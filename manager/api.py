"""The management plane over REST: FastAPI on uvicorn, in a thread of ``dlhub-manager serve``.

    client (httpx, curl) --HTTP + Bearer token--> FastAPI app --> Repository (SQL + blobs)
                                                             \\-> tasks table (state lookups)

Every error is JSON ``{"code": ..., "message": ...}`` with its HTTP status (never a 200 carrying
an error string). Requests use their own database connections, so this thread never touches the
broker loop's state. OpenAPI: ``/openapi.json``; docs: ``/docs``.

Here: the app, its errors and dependencies, the servables' routes (search, describe, versions,
delete, publish) and the server. Installed on the app by ``create_app``: ``.bodies`` (the body
limits, checked before a body is read), ``.sharing_api`` (access, share, unshare, visibility),
``.tasks_api`` (run, a task's state and result), ``.datasets_api`` and the web pages.
"""

import asyncio
import inspect
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import sqlalchemy as sa

from dlhub.protocol import errors
from dlhub.protocol.search import PARAMS, SearchParameterError, SearchQuery
from dlhub.protocol.servable import OWNER_PATTERN, VISIBILITIES, RecordError, parse_record

from .auth import Authenticator
from .bodies import API, MAX_UPLOAD_PART, BodyTooLarge, BoundedBodies
from .datasets import linked_datasets
from .repository import Access, NotFound, Repository, RepositoryError, Viewer, no_servable
from .sharing_api import shares_of
from .tasks_api import task_outcome as task_outcome  # re-exported: (status, body) of a task

if TYPE_CHECKING:
    from .services import ServableService

log = logging.getLogger("dlhub.manager.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _error(status: int, code: str, message: str, **extra: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"code": code, "message": message, **extra}, status_code=status)


def endpoint_required(exc: errors.EndpointRequired, field: str) -> ApiError:
    """409 ``endpoint-required``, worded for REST (``field``: where the caller names one), with
    the neutral ``reason`` and the candidate ``endpoints`` for clients that word it themselves."""
    return ApiError(
        409,
        exc.code,
        f'{exc.reason}; name one with the {field} "endpoint"',
        reason=exc.reason,
        endpoints=exc.candidates,
    )


# bounds for REST integers (SQLite and PostgreSQL integers are 64-bit; versions are small)
MAX_VERSION = 2**31 - 1
# uvicorn: requests handled at once (more: 503), header bytes, idle keep-alive seconds
REST_CONCURRENCY = 256
REST_MAX_HEADER_BYTES = 64 * 1024
REST_KEEP_ALIVE_S = 5


def search_parameters(query: Callable[..., Any]) -> Callable[..., SearchQuery]:
    """A FastAPI dependency whose query parameters are :data:`dlhub.protocol.search.PARAMS`
    (named, typed, defaulted and bounded as there; FastAPI checks them: 422 on a bad one) and
    which returns their :class:`SearchQuery`. ``query``: ``fastapi.Query`` (imported lazily)."""

    def parameters(**values: Any) -> SearchQuery:
        try:
            return SearchQuery.from_params(values)
        except SearchParameterError as exc:
            raise ApiError(422, "invalid-request", str(exc)) from None

    signature = []
    for p in PARAMS:
        annotation: Any = p.type | None if p.filter else p.type
        if p.minimum is not None or p.maximum is not None:
            annotation = Annotated[annotation, query(ge=p.minimum, le=p.maximum)]
        elif p.pattern is not None:
            annotation = Annotated[annotation, query(pattern=p.pattern)]
        signature.append(
            inspect.Parameter(
                p.http_name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=annotation
            )
        )
    parameters.__signature__ = inspect.Signature(signature, return_annotation=SearchQuery)  # type: ignore[attr-defined]
    return parameters


def create_app(
    engine: sa.Engine, repository: Repository, auth: Authenticator, servables: "ServableService | None" = None
):
    """The FastAPI app (imported here: FastAPI costs ~0.4 s, kept off the manager's start-up)."""
    from fastapi import Depends, FastAPI, Header, Path, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    # any route may answer these, always as {"code", "message", ...} (see _error); documented in
    # /openapi.json so that clients (and the schemathesis run in tests/fuzz) know them
    error_body = {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            }
        }
    }
    statuses = {
        400: "bad request",
        401: "no valid bearer token",
        403: "forbidden",
        404: "not found (or not visible to the caller)",
        409: "conflict",
        413: "request body too large",
        422: "invalid request",
        429: "quota exceeded",
    }
    app = FastAPI(
        title="dlhub",
        version="0.1.0",
        description="Publish, find and run servables.",
        responses={code: {"description": why, **error_body} for code, why in statuses.items()},
    )
    app.add_middleware(BoundedBodies, check_token=auth.check)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, **exc.extra)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return _error(404, "not-found", str(exc))

    @app.exception_handler(RecordError)
    async def _bad_record(request: Request, exc: RecordError):
        return _error(422, "invalid-record", str(exc))

    @app.exception_handler(RepositoryError)
    async def _repo_error(request: Request, exc: RepositoryError):
        return _error(400, "bad-request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(422, "invalid-request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http", str(exc.detail))

    def user(authorization: Annotated[str | None, Header()] = None) -> tuple[str, str]:
        """The (name, role) of the bearer token, or 401."""
        scheme, _, token = (authorization or "").partition(" ")
        who = auth.check(token.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise ApiError(401, "access-denied", "a valid 'Authorization: Bearer <token>' header is required")
        if who[1] == "endpoint":
            message = f"{who[0]} has an endpoint token: endpoint tokens only register endpoints"
            raise ApiError(403, "forbidden", message)
        return who

    User = Annotated[tuple[str, str], Depends(user)]
    TaskId = Annotated[str, Path(pattern=r"^(?:[0-9a-fA-F]{2})+$", description="the task id in hex")]

    def may_change(who: tuple[str, str], owner: str) -> None:
        if who[1] != "admin" and who[0] != owner:
            raise ApiError(403, "forbidden", f"{who[0]} may not change servables of {owner}")

    # ---- visibility: a private servable the caller may not see is "not found", in the same
    # words as one that does not exist (no existence leak)

    def viewer_of(who: tuple[str, str]) -> Viewer:
        if servables is not None:
            return servables.viewer(who[0], who[1])
        from .auth import groups_of

        return Viewer(who[0], who[1] == "admin", frozenset(groups_of(engine, who[0])))

    def access_of(owner: str, name: str) -> Access:
        return servables.access(owner, name) if servables is not None else repository.access(owner, name)

    def must_see(who: tuple[str, str], owner: str, name: str, version: int | None = None) -> Access:
        access = access_of(owner, name)
        if who[0] != owner and not access.allows(owner, viewer_of(who)):
            raise NotFound(no_servable(owner, name, version))
        return access

    def must_own(who: tuple[str, str], owner: str, name: str) -> Access:
        """Owner or admin may change it; others: not found unless they can see it (then 403)."""
        access = must_see(who, owner, name)
        if who[1] != "admin" and who[0] != owner:
            if not repository.exists(owner, name):
                raise NotFound(no_servable(owner, name))
            may_change(who, owner)
        return access

    def publish_owner(who: tuple[str, str], field: object) -> str:
        """The owner a publish goes under: the token's user, or (admins only) the form's ``owner``,
        e.g. ``examples`` for the servables ``dlhub up`` publishes, apart from the admin's own."""
        if field is None or field == "" or field == who[0]:
            return who[0]
        if not isinstance(field, str) or not re.fullmatch(OWNER_PATTERN, field):
            raise ApiError(
                422, "invalid-request", f"form field 'owner' must be a user name like 'examples': {field!r}"
            )
        if who[1] != "admin":
            raise ApiError(403, "forbidden", f"{who[0]} may not publish for {field} (only an admin may)")
        return field

    @app.get(f"{API}/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API}/metrics")
    async def metrics_json(who: User) -> dict[str, Any]:
        """Tasks, the result cache, and per endpoint: batching and per-servable counts (only of
        servables the caller may see)."""
        service = need_services()
        return await asyncio.to_thread(lambda: service.visible_status(service.status(), viewer_of(who)))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_prometheus(who: User):
        """The same in Prometheus' text format (scrape with a bearer token)."""
        from .metrics import prometheus_text

        service = need_services()
        status = await asyncio.to_thread(lambda: service.visible_status(service.status(), viewer_of(who)))
        return PlainTextResponse(prometheus_text(status), media_type="text/plain; version=0.0.4")

    @app.get(f"{API}/whoami")
    def whoami(who: User) -> dict[str, Any]:
        """The token's user and role, and the endpoint used when a request names none."""
        default = servables.manager.config.default_endpoint if servables is not None else None
        return {"user": who[0], "role": who[1], "default_endpoint": default}

    Search = Annotated[SearchQuery, Depends(search_parameters(Query))]

    @app.get(f"{API}/servables")
    def search(search: Search, who: User) -> dict[str, Any]:
        hits = repository.search(search, viewer=viewer_of(who))
        return {"results": hits, "count": len(hits)}

    @app.get(f"{API}/servables/{{owner}}/{{name}}")
    def describe(
        who: User, owner: str, name: str, version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None
    ) -> dict[str, Any]:
        access = must_see(who, owner, name)
        versions = repository.versions(owner, name)
        ready = [v["version"] for v in versions if v["status"] == "ready"]
        shown = [v["version"] for v in versions if v["status"] != "deleted"]
        if version is None and not shown:
            raise NotFound(f"every version of {owner}/{name} was deleted")
        wanted = version or (ready[-1] if ready else shown[-1])
        record, status, error = repository.get(owner, name, wanted)
        return {
            "record": record.model_dump(mode="json"),
            "status": status,
            "error": error,
            "versions": versions,
            "visibility": access.visibility,
            "datasets": linked_datasets(repository, record, viewer_of(who)),
            **({"shares": shares_of(access)} if who[1] == "admin" or who[0] == owner else {}),
        }

    @app.get(f"{API}/servables/{{owner}}/{{name}}/versions")
    def versions(who: User, owner: str, name: str) -> dict[str, Any]:
        must_see(who, owner, name)
        return {"versions": repository.versions(owner, name)}

    @app.delete(f"{API}/servables/{{owner}}/{{name}}")
    def delete_all(who: User, owner: str, name: str) -> dict[str, Any]:
        must_own(who, owner, name)
        return {"deleted": repository.delete(owner, name)}

    @app.delete(f"{API}/servables/{{owner}}/{{name}}/{{version}}")
    def delete_version(
        who: User, owner: str, name: str, version: Annotated[int, Path(ge=1, le=MAX_VERSION)]
    ) -> dict[str, Any]:
        must_own(who, owner, name)
        return {"deleted": repository.delete(owner, name, version)}

    from .sharing_api import install as install_sharing  # access, share, unshare, visibility

    # what the route modules take besides create_app's locals (module-level names of this one)
    shared = {
        "ApiError": ApiError,
        "API": API,
        "MAX_VERSION": MAX_VERSION,
        "endpoint_required": endpoint_required,
        "search_parameters": search_parameters,
        "shares_of": shares_of,
    }
    handlers = install_sharing(app, {**locals(), **shared})

    def need_services() -> Any:
        if servables is None:
            raise ApiError(503, "unavailable", "this server has no manager behind it")
        return servables

    publish_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["record"],
                        "properties": {
                            "record": {"type": "string", "description": "the servable record as JSON"},
                            "files": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "one part per file; its filename is the path in the record",
                            },
                            "endpoint": {
                                "type": "string",
                                "description": "endpoint that verifies it (default: the manager's default)",
                            },
                            "owner": {
                                "type": "string",
                                "description": "admins: publish for this owner, not the token's user",
                            },
                            "visibility": {
                                "type": "string",
                                "enum": list(VISIBILITIES),
                                "description": "public or private (default: public for a new "
                                "servable, else unchanged)",
                            },
                        },
                    }
                }
            },
        }
    }

    @app.post(f"{API}/servables", status_code=202, openapi_extra=publish_body)
    async def publish(who: User, request: Request) -> dict[str, Any]:
        """multipart/form-data: ``record`` (JSON), one ``files`` part per file (its filename is
        the path in the record), optional ``endpoint`` to verify on, optional ``owner`` (admins:
        publish for that owner, e.g. ``examples``). 202: verification runs."""
        service = need_services()
        try:
            form = await request.form(max_files=10_000, max_fields=100, max_part_size=MAX_UPLOAD_PART)
        except BodyTooLarge as exc:
            raise ApiError(413, "payload-too-large", str(exc)) from None
        except Exception as exc:  # malformed multipart bodies
            raise ApiError(400, "bad-request", f"cannot read the multipart form: {exc}") from None
        owner = publish_owner(who, form.get("owner"))
        raw = form.get("record")
        if isinstance(raw, UploadFile):
            raw = (await raw.read()).decode()
        if not raw:
            raise ApiError(
                422, "invalid-request", "the form needs a 'record' field (the servable record as JSON)"
            )
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(422, "invalid-record", f"record is not JSON: {exc}") from None
        if isinstance(data, dict) and (data.get("owner") or data.get("version")):
            raise ApiError(
                422,
                "invalid-record",
                "owner and version are set by the manager; leave them out of the record "
                "(an admin publishing for another owner sends the form field 'owner')",
            )
        record = parse_record(data)
        files: dict[str, bytes] = {}
        for part in form.getlist("files"):
            if not isinstance(part, UploadFile) or not part.filename:
                raise ApiError(422, "invalid-request", "each 'files' part must be a file named by its path")
            if part.filename in files:
                raise ApiError(422, "invalid-request", f"file {part.filename!r} was sent twice")
            files[part.filename] = await part.read()
        endpoint_field = form.get("endpoint")
        try:
            endpoint = service.default_endpoint(endpoint_field if isinstance(endpoint_field, str) else None)
        except errors.UnknownEndpoint as exc:
            raise ApiError(404, "unknown-endpoint", str(exc)) from None
        except errors.EndpointRequired as exc:
            raise endpoint_required(exc, "form field") from None
        visibility = form.get("visibility") or None
        if visibility is not None and visibility not in VISIBILITIES:
            raise ApiError(
                422, "invalid-request", f"form field 'visibility' must be public or private: {visibility!r}"
            )
        published = await asyncio.to_thread(
            lambda: repository.publish(owner, record, files, visibility=visibility, publisher=viewer_of(who))
        )
        service.verify(published, endpoint, who[0])  # the endpoint policy checks the publisher
        return {"ref": published.ref, "status": "pending", "verifying_on": endpoint}

    from .tasks_api import install as install_tasks  # run, a task's state and result

    handlers |= install_tasks(app, {**locals(), **shared})
    from .datasets_api import install as install_datasets  # data sets and uploads

    install_datasets(app, {**locals(), **shared})
    from .web import install as install_web  # the pages call the handlers above (dlhub.manager.web)

    install_web(app, {**locals(), **handlers, **shared})
    return app


class ApiServer:
    """uvicorn on a socket bound (and listening) at once, so its URL is known and connections
    queue; the app is built and served on a background thread."""

    def __init__(
        self,
        make_app: Callable[[], Any],
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[str, str] | None = None,  # (certificate, key) PEM files: serve HTTPS
    ):
        self.make_app = make_app
        self.tls = tls
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on accepted sockets whose proto
        # says TCP, and they inherit this socket's (0 by default). Without it uvicorn's two writes
        # per response (head, body) meet Nagle and the client's delayed ACK: every request after
        # the first on a kept-alive connection took ~44 ms (see benchmarks/README.md)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.url = f"{'https' if tls else 'http'}://{host}:{self.sock.getsockname()[1]}"
        self.server: Any = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="dlhub-rest", daemon=True)

    def _serve(self) -> None:
        import uvicorn

        try:
            app = self.make_app()
        except Exception:  # a listening socket nobody serves would hang every client
            log.exception("the REST API failed to start; closing its port")
            self.sock.close()
            self.ready.set()
            return
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            h11_max_incomplete_event_size=REST_MAX_HEADER_BYTES,  # headers larger: 400, closed
            timeout_keep_alive=REST_KEEP_ALIVE_S,
            limit_concurrency=REST_CONCURRENCY,  # above it: 503 at once, not an unbounded queue
            ssl_certfile=self.tls[0] if self.tls else None,
            ssl_keyfile=self.tls[1] if self.tls else None,
        )
        self.server = uvicorn.Server(config)
        self.ready.set()
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.ready.wait(timeout)
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
