"""The management plane over REST: FastAPI on uvicorn, in a thread of ``dlhub-manager serve``.

    client (httpx, curl) --HTTP + Bearer token--> FastAPI app --> Repository (SQL + blobs)
                                                             \\-> tasks table (state lookups)

Every error is JSON ``{"code": ..., "message": ...}`` with its HTTP status (never a 200 carrying
an error string). Requests use their own database connections, so this thread never touches the
broker loop's state. OpenAPI: ``/openapi.json``; docs: ``/docs``.
"""

import asyncio
import concurrent.futures
import contextlib
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
from dlhub.protocol import messages as m
from dlhub.protocol.search import PARAMS, SearchParameterError, SearchQuery
from dlhub.protocol.servable import OWNER_PATTERN, VISIBILITIES, RecordError, parse_record

from .auth import Authenticator
from .datasets import linked_datasets
from .repository import Access, NotFound, Repository, RepositoryError, Viewer, no_servable
from .store import TERMINAL, tasks_table, unpack_error

if TYPE_CHECKING:
    from .services import ServableService

API = "/api/v1"
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


# HTTP status of a failed task, by its error code (the JSON body carries code and message)
TASK_ERROR_STATUS = {
    "servable-not-found": 404,
    "unknown-endpoint": 404,
    "payload-too-large": 413,
    "task-timeout": 504,
    "worker-lost": 502,
    "endpoint-lost": 502,
    "lost": 502,
    "cancelled": 409,
    "quota-exceeded": 429,
}
MAX_UPLOAD_PART = 1024 * 1024 * 1024
# request bodies: JSON (run, share...) up to MAX_BODY_BYTES; a publish (multipart, the files of a
# servable) up to MAX_PUBLISH_BYTES in all. Larger: 413 before the body is read.
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_PUBLISH_BYTES = MAX_UPLOAD_PART
PUBLISH_PATH = f"{API}/servables"
OUTPUTS_PATH = f"{API}/outputs"  # outputs by reference: authorized by an upload grant, streamed
# bounds for REST integers (SQLite and PostgreSQL integers are 64-bit; versions are small)
MAX_VERSION = 2**31 - 1
MAX_TIMEOUT_S = 30 * 24 * 3600.0
COMMIT_WAIT_S = 5.0  # a REST run answers its task id once the row is committed, or after this
# uvicorn: requests handled at once (more: 503), header bytes, idle keep-alive seconds
REST_CONCURRENCY = 256
REST_MAX_HEADER_BYTES = 64 * 1024
REST_KEEP_ALIVE_S = 5


def task_outcome(task_id: str, state: str, payload: bytes | None, error: list | None) -> tuple[int, dict]:
    """(HTTP status, body) for a task: 200 with the JSON result, 202 while it runs, else an error."""
    from .services import result_value

    if state not in TERMINAL:
        return 202, {"task_id": task_id, "state": state}
    if state == "succeeded":
        try:
            value = result_value([b"", state, payload, None, None, None])
        except (errors.SerializationError, ValueError):
            return 406, {
                "code": "not-json",
                "message": "this result was serialized for a Python client; read it with Executor.fetch",
                "task_id": task_id,
            }
        return 200, {"task_id": task_id, "state": state, "result": value}
    code, message, tb_text = (error or ["lost", f"task ended {state}", ""])[:3]
    status = TASK_ERROR_STATUS.get(code, 422)  # 422: the servable raised on this input
    body = {"code": code if code in TASK_ERROR_STATUS else "task-failed", "message": message}
    return status, {**body, "task_id": task_id, "state": state, "traceback": tb_text or None}


# An unauthenticated body up to this size is read (and dropped) before the 401, so the client
# reads the answer instead of a connection reset; anything larger is refused unread.
DRAIN_BEFORE_REFUSAL_BYTES = 1 << 20


class BodyTooLarge(Exception):
    """A body streamed without Content-Length went past its limit."""


class BoundedBodies:
    """ASGI middleware: a request with a body (POST/PUT/PATCH/DELETE: every such route needs a
    token) is refused before a byte of it is read when its token is not valid (401) or its
    Content-Length is above the limit (413); a body streamed without Content-Length is counted
    as it arrives and refused at the limit. Errors are the API's JSON ``{code, message}``."""

    def __init__(self, app: Any, check_token: Callable[[str], Any]):
        self.app, self.check_token = app, check_token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            return await self.app(scope, receive, send)
        if scope["path"].startswith(OUTPUTS_PATH) and b"grant=" in scope.get("query_string", b""):
            # a call's output stored by its endpoint: the route checks the upload grant before it
            # reads a byte, then streams the body to disk (declared size at most MAX_FILE_BYTES)
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        ok = scheme.lower() == "bearer" and token.strip()
        if not ok or await asyncio.to_thread(self.check_token, token.strip()) is None:
            await self._drain_small(receive, headers.get(b"content-length"))
            return await self._refuse(
                send, 401, "access-denied", "a valid 'Authorization: Bearer <token>' header is required"
            )
        publish = scope["method"] == "POST" and scope["path"].rstrip("/") == PUBLISH_PATH
        limit = MAX_PUBLISH_BYTES if publish else MAX_BODY_BYTES
        what = "a publish" if publish else "a request body"
        too_large = f"{what} may be at most {limit:,} bytes"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(send, 400, "bad-request", "Content-Length is not a number")
            if int(length) > limit:
                return await self._refuse(send, 413, "payload-too-large", f"{too_large}; got {int(length):,}")
        if publish:  # large: streamed to the form parser, counted on the way
            seen = 0

            async def counted() -> dict:
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(too_large)
                return message

            return await self.app(scope, counted, send)
        chunks, seen = [], 0  # small: read here (at most the limit), then replayed
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await self._refuse(send, 413, "payload-too-large", too_large)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def _drain_small(receive: Callable, length: bytes | None) -> None:
        """Read and drop a small body before refusing it: closing a connection with unread bytes
        makes the kernel reset it, and a client still sending then sees "connection reset"
        instead of the 401. Large bodies (the attack) are not read: they get the reset."""
        if length is not None and (not length.isdigit() or int(length) > DRAIN_BEFORE_REFUSAL_BYTES):
            return
        seen = 0
        while seen <= DRAIN_BEFORE_REFUSAL_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    @staticmethod
    async def _refuse(send: Callable, status: int, code: str, message: str) -> None:
        body = json.dumps({"code": code, "message": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))  # the unread body must not be parsed as a request
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


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
    from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
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

    def shares_of(access: Access) -> dict[str, list[str]]:
        return {"users": sorted(access.users), "groups": sorted(access.groups)}

    def access_body(owner: str, name: str, access: Access) -> dict[str, Any]:
        return {"servable": f"{owner}/{name}", "visibility": access.visibility, **shares_of(access)}

    def principals(users: list[str], groups: list[str]) -> tuple[list[str], list[str]]:
        """Checked user and group names (422 naming a bad one; at least one of either)."""
        if not users and not groups:
            raise ApiError(422, "invalid-request", "name at least one of 'users' or 'groups'")
        for kind, names in (("user", users), ("group", groups)):
            for principal in names:
                if not isinstance(principal, str) or not re.fullmatch(OWNER_PATTERN, principal):
                    raise ApiError(422, "invalid-request", f"{kind} name {principal!r} is not valid")
        return sorted(set(users)), sorted(set(groups))

    @app.get(f"{API}/servables/{{owner}}/{{name}}/access")
    def get_access(who: User, owner: str, name: str) -> dict[str, Any]:
        """Visibility and shares (owner and admins)."""
        must_own(who, owner, name)
        if not repository.exists(owner, name):
            raise NotFound(no_servable(owner, name))
        return access_body(owner, name, repository.access(owner, name))

    @app.post(f"{API}/servables/{{owner}}/{{name}}/share")
    def share(
        who: User,
        owner: str,
        name: str,
        users: Annotated[list[str], Body()] = [],  # noqa: B006 - FastAPI copies defaults
        groups: Annotated[list[str], Body()] = [],  # noqa: B006
    ) -> dict[str, Any]:
        """Let ``users`` and members of ``groups`` see and run a private servable (owner, admins)."""
        must_own(who, owner, name)
        users, groups = principals(users, groups)
        body = access_body(owner, name, repository.share(owner, name, users, groups))
        warnings = unknown_principals(users, groups)
        return {**body, "warnings": warnings} if warnings else body

    def unknown_principals(users: list[str], groups: list[str]) -> list[str]:
        """Shares with names nobody has (yet) are kept, as the owner asked, but said out loud."""
        from .store import groups_table, users_table

        with engine.connect() as conn:
            known_users = set(
                conn.execute(sa.select(users_table.c.name).where(users_table.c.name.in_(users))).scalars()
            )
            known_groups = set(
                conn.execute(sa.select(groups_table.c.name).where(groups_table.c.name.in_(groups))).scalars()
            )
        return [f"there is no user {u!r} (yet)" for u in users if u not in known_users] + [
            f"there is no group {g!r} (yet)" for g in groups if g not in known_groups
        ]

    @app.post(f"{API}/servables/{{owner}}/{{name}}/unshare")
    def unshare(
        who: User,
        owner: str,
        name: str,
        users: Annotated[list[str], Body()] = [],  # noqa: B006 - FastAPI copies defaults
        groups: Annotated[list[str], Body()] = [],  # noqa: B006
    ) -> dict[str, Any]:
        """Take shares back (owner, admins); the servable's owner and admins always see it."""
        must_own(who, owner, name)
        users, groups = principals(users, groups)
        return access_body(owner, name, repository.unshare(owner, name, users, groups))

    @app.put(f"{API}/servables/{{owner}}/{{name}}/visibility")
    def set_visibility(
        who: User, owner: str, name: str, visibility: Annotated[str, Body(embed=True)]
    ) -> dict[str, Any]:
        """``{"visibility": "public" | "private"}`` (owner, admins)."""
        must_own(who, owner, name)
        return access_body(owner, name, repository.set_visibility(owner, name, visibility))

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

    @app.post(f"{API}/servables/{{owner}}/{{name}}/run")
    async def run(
        who: User,
        owner: str,
        name: str,
        args: Annotated[list[Any], Body()] = [],  # noqa: B006 - FastAPI copies defaults
        kwargs: Annotated[dict[str, Any], Body()] = {},  # noqa: B006
        version: Annotated[int | None, Body(ge=1, le=MAX_VERSION)] = None,
        endpoint: Annotated[str | None, Body()] = None,
        wait_s: Annotated[float, Body(ge=0, le=3600, allow_inf_nan=False)] = 30.0,
        timeout_s: Annotated[float | None, Body(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)] = None,
        cache: Annotated[bool, Body()] = True,
    ):
        """Run a servable with JSON arguments. ``wait_s`` 0: return the task id at once (202);
        otherwise wait that long for the result (200), else 202 with the id to poll."""
        service = need_services()
        ref = f"{owner}/{name}" + (f":{version}" if version else "")
        try:
            await asyncio.to_thread(service.resolve, ref, viewer_of(who))
            target = service.default_endpoint(endpoint)
        except errors.ServableNotFound as exc:
            raise ApiError(404, "servable-not-found", str(exc)) from None
        except errors.UnknownEndpoint as exc:
            raise ApiError(404, "unknown-endpoint", str(exc)) from None
        except errors.EndpointRequired as exc:
            raise endpoint_required(exc, "JSON field") from None
        committed: concurrent.futures.Future = concurrent.futures.Future()
        task_id, future = service.submit(
            who[0], target, m.REF_PREFIX + ref, args, kwargs, timeout_s, cache=cache, committed=committed
        )
        tid = task_id.hex()
        location = {"Location": f"{API}/tasks/{tid}/result"}
        if wait_s:
            try:
                res = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait_s)
            except asyncio.TimeoutError:
                res = None
            if res is not None:
                status, body = task_outcome(tid, res[m.R_STATE], res[m.R_PAYLOAD], res[m.R_ERROR])
                return JSONResponse(body, status_code=status, headers=location)
        # the id is answered once its row is committed, so the caller's first poll finds it (a
        # stalled database: answered after COMMIT_WAIT_S anyway; polls of a task still open
        # read queued, as the Router knows it)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(committed)), COMMIT_WAIT_S)
        return JSONResponse({"task_id": tid, "state": "queued"}, status_code=202, headers=location)

    def task_row(who: tuple[str, str], task_id: str, columns) -> dict[str, Any]:
        try:
            raw = bytes.fromhex(task_id)
        except ValueError:
            raise ApiError(422, "invalid-request", f"task id {task_id!r} is not hex") from None
        t = tasks_table

        def read() -> dict[str, Any] | None:
            with engine.connect() as conn:
                row = conn.execute(sa.select(t.c.owner, *columns).where(t.c.task_id == raw)).first()
            return dict(row._mapping) if row is not None else None

        record = read()
        manager = servables.manager if servables is not None else None
        standing = None
        if (record is None or record["state"] not in TERMINAL) and manager is not None:
            standing = manager.task_standing(raw, who[0])  # one ask of the loop
        if standing == "finished":
            # its result went out before its row's group commit (a caller who just got it from
            # the Executor asks at once): wait for that commit, then read the row that landed
            manager.store.flush()
            record = read()
        elif record is None and standing == "pending":
            # answered to its caller but not yet committed (group commit): queued, not missing
            record = {"owner": who[0], **{c.name: None for c in columns}, "state": "queued"}
        if record is None or (who[1] != "admin" and record["owner"] != who[0]):
            # another user's task reads exactly like one that does not exist (no existence leak)
            raise ApiError(404, "not-found", f"there is no task {task_id}")
        return record

    @app.get(f"{API}/tasks/{{task_id}}/result")
    def task_result(who: User, task_id: TaskId):
        """200 with the JSON result; 202 while the task runs; an error status when it failed."""
        t = tasks_table
        row = task_row(who, task_id, [t.c.state, t.c.result, t.c.error])
        status, body = task_outcome(task_id, row["state"], row["result"], unpack_error(row["error"]))
        return JSONResponse(body, status_code=status)

    @app.get(f"{API}/tasks/{{task_id}}")
    def task(who: User, task_id: TaskId) -> dict[str, Any]:
        t = tasks_table
        cols = [c for c in t.c if c.name not in ("payload", "result", "error", "task_id", "owner")]
        return {"task_id": task_id, **task_row(who, task_id, cols)}

    from .datasets_api import install as install_datasets  # data sets and uploads

    install_datasets(
        app, {**locals(), "ApiError": ApiError, "API": API, "MAX_VERSION": MAX_VERSION,
              "search_parameters": search_parameters},
    )  # fmt: skip
    from .web import install as install_web  # the pages call the handlers above (dlhub.manager.web)

    install_web(app, {**locals(), "ApiError": ApiError})
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
