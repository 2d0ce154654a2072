"""REST routes for running a servable and reading its task, installed on the API's app by
``create_app``.

    POST /api/v1/servables/{owner}/{name}/run   {args, kwargs, version, endpoint, wait_s, ...}:
                                                200 with the result within ``wait_s``, else 202
                                                with the task id (answered once its row is
                                                committed, or after ``COMMIT_WAIT_S``)
    GET  /api/v1/tasks/{id}/result              200 result; 202 while it runs; an error status
    GET  /api/v1/tasks/{id}                     the task's row (state, times, endpoint ...)

Another user's task reads exactly like one that does not exist. ``ApiError`` and the app's
dependencies are passed in (this module imports nothing from ``api``: the import graph stays
acyclic).
"""

import asyncio
import concurrent.futures
import contextlib
from typing import Annotated, Any

import sqlalchemy as sa

from dlhub.protocol import errors
from dlhub.protocol import messages as m

from .store import TERMINAL, tasks_table, unpack_error

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
MAX_TIMEOUT_S = 30 * 24 * 3600.0
COMMIT_WAIT_S = 5.0  # a REST run answers its task id once the row is committed, or after this


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


def install(app: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Add the routes to ``app``; returns them by name (the web pages call them)."""
    from fastapi import Body
    from fastapi.responses import JSONResponse

    ApiError, API, User, TaskId = ctx["ApiError"], ctx["API"], ctx["User"], ctx["TaskId"]
    engine, servables, max_version = ctx["engine"], ctx["servables"], ctx["MAX_VERSION"]
    need_services, viewer_of = ctx["need_services"], ctx["viewer_of"]
    endpoint_required = ctx["endpoint_required"]

    @app.post(f"{API}/servables/{{owner}}/{{name}}/run")
    async def run(
        who: User,
        owner: str,
        name: str,
        args: Annotated[list[Any], Body()] = [],  # noqa: B006 - FastAPI copies defaults
        kwargs: Annotated[dict[str, Any], Body()] = {},  # noqa: B006
        version: Annotated[int | None, Body(ge=1, le=max_version)] = None,
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

    return {"run": run, "task": task, "task_result": task_result}
