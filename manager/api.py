"""The management plane over REST: FastAPI on uvicorn, in a thread of ``dlhub-manager serve``.

    client (httpx, curl) --HTTP + Bearer token--> FastAPI app --> Repository (SQL + blobs)
                                                             \\-> tasks table (state lookups)

Every error is JSON ``{"code": ..., "message": ...}`` with its HTTP status (never a 200 carrying
an error string). Requests use their own database connections, so this thread never touches the
broker loop's state. OpenAPI: ``/openapi.json``; docs: ``/docs``.
"""

import socket
import threading
from collections.abc import Callable
from typing import Annotated, Any

import sqlalchemy as sa

from dlhub.protocol.servable import RecordError

from .auth import Authenticator
from .repository import NotFound, Repository, RepositoryError
from .store import tasks_table

API = "/api/v1"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"code": code, "message": message}, status_code=status)


def create_app(engine: sa.Engine, repository: Repository, auth: Authenticator):
    """The FastAPI app (imported here: FastAPI costs ~0.4 s, kept off the manager's start-up)."""
    from fastapi import Depends, FastAPI, Header, Query, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="dlhub", version="0.1.0", description="Publish, find and run servables.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message)

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
        return who

    User = Annotated[tuple[str, str], Depends(user)]

    def may_change(who: tuple[str, str], owner: str) -> None:
        if who[1] != "admin" and who[0] != owner:
            raise ApiError(403, "forbidden", f"{who[0]} may not change servables of {owner}")

    @app.get(f"{API}/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API}/servables")
    def search(
        who: User,
        q: str = "",
        owner: str | None = None,
        domain: str | None = None,
        author: str | None = None,
        related: str | None = None,
        only_latest: bool = True,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
    ) -> dict[str, Any]:
        hits = repository.search(
            q,
            owner=owner,
            domain=domain,
            author=author,
            related=related,
            only_latest=only_latest,
            limit=limit,
        )
        return {"results": hits, "count": len(hits)}

    @app.get(f"{API}/servables/{{owner}}/{{name}}")
    def describe(who: User, owner: str, name: str, version: int | None = None) -> dict[str, Any]:
        versions = repository.versions(owner, name)
        ready = [v["version"] for v in versions if v["status"] == "ready"]
        wanted = version or (ready[-1] if ready else versions[-1]["version"])
        record, status, error = repository.get(owner, name, wanted)
        return {
            "record": record.model_dump(mode="json"),
            "status": status,
            "error": error,
            "versions": versions,
        }

    @app.get(f"{API}/servables/{{owner}}/{{name}}/versions")
    def versions(who: User, owner: str, name: str) -> dict[str, Any]:
        return {"versions": repository.versions(owner, name)}

    @app.delete(f"{API}/servables/{{owner}}/{{name}}")
    def delete_all(who: User, owner: str, name: str) -> dict[str, Any]:
        may_change(who, owner)
        return {"deleted": repository.delete(owner, name)}

    @app.delete(f"{API}/servables/{{owner}}/{{name}}/{{version}}")
    def delete_version(who: User, owner: str, name: str, version: int) -> dict[str, Any]:
        may_change(who, owner)
        return {"deleted": repository.delete(owner, name, version)}

    @app.get(f"{API}/tasks/{{task_id}}")
    def task(who: User, task_id: str) -> dict[str, Any]:
        try:
            raw = bytes.fromhex(task_id)
        except ValueError:
            raise ApiError(422, "invalid-request", f"task id {task_id!r} is not hex") from None
        t = tasks_table
        cols = [c for c in t.c if c.name not in ("payload", "result", "error", "task_id")]
        with engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(t.c.task_id == raw)).first()
        if row is None:
            raise ApiError(404, "not-found", f"there is no task {task_id}")
        record = dict(row._mapping)
        if who[1] != "admin" and record["owner"] != who[0]:
            raise ApiError(403, "forbidden", f"task {task_id} belongs to another user")
        return {"task_id": task_id, **record}

    return app


class ApiServer:
    """uvicorn on a socket bound (and listening) at once, so its URL is known and connections
    queue; the app is built and served on a background thread."""

    def __init__(self, make_app: Callable[[], Any], host: str = "127.0.0.1", port: int = 0):
        self.make_app = make_app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server: Any = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="dlhub-rest", daemon=True)

    def _serve(self) -> None:
        import uvicorn

        config = uvicorn.Config(self.make_app(), log_level="warning", access_log=False, lifespan="off")
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
