"""The Globus Compute REST API on the manager: the unmodified ``globus_compute_sdk.Client`` runs
functions on dlhub endpoints.

Served on its own port by ``dlhub-manager serve --globus-compute-port PORT`` (and ``dlhub up``, on
5000 when free: the SDK's ``environment="local"``), with the same users and Bearer tokens as the
REST API. Identities (no table, nothing to migrate):

- an endpoint's UUID is ``uuid5(GC_NAMESPACE, name)`` (:func:`dlhub.protocol.gc_serialize.endpoint_uuid`);
- a registered function is stored once as dlhub code (``GC_CODE`` + its ``function_code``) under
  its sha256 digest; its UUID is the digest's first 16 bytes, so it is found again after a restart;
- a GC task id is the dlhub task id (16 bytes) as a UUID.

Tasks go through the manager's normal path (``Submit`` routed on its loop: batching, caching,
limits, retries, cancellation apply) with the serializer ``gc``: the worker decodes the SDK's
payload and encodes the result as the SDK decodes it; the manager never unpickles anything.
"""

import concurrent.futures
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any

import sqlalchemy as sa

from dlhub.protocol import gc_serialize as gc
from dlhub.protocol import messages as m

from . import events as ev
from .schema import code_table, tasks_table, versions_table
from .store import TERMINAL, unpack_error

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
GC_STATES = {
    "received": "waiting-for-ep",
    "queued": "waiting-for-ep",
    "dispatched": "waiting-for-ep",
    "running": "running",
    "succeeded": "success",
    "failed": "failed",
    "cancelled": "failed",
    "lost": "failed",
}
RECENT_TASKS = 200_000  # submitted task ids remembered until the store has them (and beyond)
# a GC task's client_session column names its task group (kept across restarts): "gcq:<group>"
# when its results go to the group's AMQP queue (the SDK's Executor), "gc:<group>" when not (Client)
SESSION_PREFIX, QUEUED_PREFIX = "gc:", "gcq:"
REPUBLISH_AFTER_CRASH_S = 600.0  # after an unclean stop: results this recent are published again
CLEAN_STOP_FILE = "amqp.clean"  # written (the time) when the publisher flushed everything at stop


def function_uuid(digest: str) -> str:
    return str(uuid.UUID(hex=digest.removeprefix("sha256:")[:32]))


def create_gc_app(manager: Any, publisher: Any = None, published_until: float | None = None):
    """The FastAPI app of the GC API over a started :class:`dlhub.manager.broker.Manager`.
    ``publisher``: a :class:`dlhub.manager.amqp.ResultPublisher` (the SDK's Executor gets its
    results over AMQP) or None: then ``/v2/get_amqp_result_connection_url`` answers 503 and
    submits that ask for a result queue get none (the Client polls over REST, as it always does).

    Each result goes to AMQP only after the task store committed it (``store.after_commit``).
    After a restart, GC tasks still unfinished get their publisher back (their task group is the
    row's ``client_session``), and results finished since ``published_until`` (the clean stop of
    the last publisher; unknown after a crash: the last ``REPUBLISH_AFTER_CRASH_S``) are
    published again: at least once; the SDK resolves each future once and ignores a repeat."""
    from fastapi import Body, Depends, FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title="dlhub: Globus Compute API", version=API_VERSION, openapi_url=None)
    engine = manager.store.engine
    auth = manager.auth
    functions: dict[str, str] = {}  # function UUID -> code digest
    recent: OrderedDict[str, tuple[str, concurrent.futures.Future]] = OrderedDict()
    groups: OrderedDict[str, tuple[str, list[str]]] = OrderedDict()  # task group -> (owner, task ids)

    class GCError(Exception):
        def __init__(self, status: int, code: str, message: str):
            self.status, self.code, self.message = status, code, message

    @app.exception_handler(GCError)
    async def _gc_error(request: Request, exc: GCError):
        # the shape globus_sdk's ComputeAPIError parses: code, error_args; reason/message for people
        body = {"code": exc.code, "error_args": [exc.message], "reason": exc.message, "message": exc.message}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message = "; ".join(str(e.get("msg")) for e in exc.errors())
        return JSONResponse({"code": "INVALID_REQUEST", "reason": message, "message": message}, 422)

    def user(authorization: str | None = Header(None)) -> tuple[str, str]:
        scheme, _, token = (authorization or "").partition(" ")
        who = auth.check(token.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise GCError(401, "UNAUTHORIZED", "a valid 'Authorization: Bearer <token>' header is required")
        if who[1] == "endpoint":
            raise GCError(403, "FORBIDDEN", f"{who[0]} has an endpoint token: it only registers endpoints")
        return who

    User = Annotated[tuple, Depends(user)]
    JSONBody = Annotated[dict, Body()]

    def endpoint_name(endpoint_uuid: str) -> tuple[str, bool]:
        """(name, connected) of the endpoint with this UUID (or name), else 404."""
        connected = manager.endpoints_connected()
        for name, online in connected.items():
            if endpoint_uuid in (name, gc.endpoint_uuid(name)):
                return name, online
        message = f"endpoint {endpoint_uuid} is not registered with this manager"
        raise GCError(404, "ENDPOINT_NOT_FOUND", message)

    def function_digest(fid: str) -> str:
        digest = functions.get(fid)
        if digest is None:
            try:
                prefix = "sha256:" + uuid.UUID(fid).hex
            except ValueError:
                prefix = None
            if prefix:
                with engine.connect() as conn:
                    c = code_table.c
                    query = sa.select(c.digest).where(c.digest.like(prefix + "%")).limit(1)
                    row = conn.execute(query).first()
                digest = row[0] if row else None
            if digest is None and prefix:  # a published servable's UUID: its latest ready version
                digest = servable_ref(fid)
            if digest is None:
                raise GCError(404, "FUNCTION_NOT_FOUND", f"function {fid} is not registered")
            functions[fid] = digest
        return digest

    servables: dict[str, str] = {}  # servable UUID -> "ref:owner/name"

    def servable_ref(fid: str) -> str | None:
        """The routable ref of the servable whose UUID is ``fid`` (the router checks access)."""
        if fid not in servables:
            v = versions_table.c
            with engine.connect() as conn:
                names = conn.execute(sa.select(v.owner, v.name).distinct()).all()
            servables.clear()
            servables.update({gc.servable_uuid(o, n): f"{m.REF_PREFIX}{o}/{n}" for o, n in names})
        return servables.get(fid)

    @app.get("/v2/version")
    def version(service: str | None = None):
        info = {"api": API_VERSION, "min_sdk_version": "2.0.0", "min_ep_version": "2.0.0"}
        info["min_endpoint_version"] = info["min_ep_version"]
        return info if service == "all" else API_VERSION

    @app.post("/v3/functions")
    def register_function(who: User, body: JSONBody):
        code = body.get("function_code")
        if not isinstance(code, str) or not code:
            message = "function_code (a packed ComputeSerializer buffer) is required"
            raise GCError(422, "INVALID_REQUEST", message)
        try:
            if len(gc.unpack_buffers(code)) != 1:
                raise ValueError("one buffer expected")
        except Exception as exc:  # noqa: BLE001 - only the framing is checked, nothing is loaded
            raise GCError(422, "INVALID_REQUEST", f"function_code is not a packed buffer: {exc}") from None
        blob = gc.code_blob(code)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        fid = function_uuid(digest)
        if fid not in functions:
            functions[fid] = digest
            manager.call_soon(lambda: manager.route(ev.CodePut(digest, blob)))
        return {"function_uuid": fid}

    def submit(owner: str, digest: str, payload: bytes, publish: Any) -> tuple:
        task_id = os.urandom(m.TASK_ID_BYTES)
        rec = m.task_record(task_id, digest, payload, None, gc.GC_SERIALIZER, None, {"cache": False})
        future: concurrent.futures.Future = concurrent.futures.Future()
        tid = str(uuid.UUID(bytes=task_id))
        done = result_callback(tid, future, publish)

        recent[tid] = (owner, future)
        while len(recent) > RECENT_TASKS:
            recent.popitem(last=False)
        return tid, rec, done

    def result_callback(tid: str, future: Any, publish: Any):
        """The loop's callback for a task's result: answer REST at once; publish to AMQP once the
        store committed the result (the result's update is enqueued before this runs)."""

        def done(res: list) -> None:
            if future is not None and not future.done():
                future.set_result(res)
            if publish is not None:
                manager.store.after_commit(lambda: publish(tid, res))

        return done

    def publisher_for(user: str, group: str, declare: bool = True):
        """A result -> AMQP message callback for the task group's queue (declared now)."""
        from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails

        if declare:
            publisher.declare_queue(user, group)

        def publish(tid: str, res: list) -> None:
            doc = outcome(tid, res[m.R_STATE], res[m.R_PAYLOAD], res[m.R_ERROR], time.time())
            try:
                if doc["status"] == "success":
                    result = Result(task_id=uuid.UUID(tid), data=doc["result"])
                else:
                    details = ResultErrorDetails(code="RemoteExecutionError", user_message=doc["exception"])
                    result = Result(task_id=uuid.UUID(tid), data=doc["exception"], error_details=details)
                publisher.publish(user, group, result)
            except Exception:  # on the manager loop: never let it raise there
                log.exception("cannot publish the result of GC task %s", tid)

        return publish

    @app.post("/v3/endpoints/{endpoint_uuid}/submit")
    def submit_batch(endpoint_uuid: str, who: User, body: JSONBody):
        name, _ = endpoint_name(endpoint_uuid)
        tasks = body.get("tasks")
        if not isinstance(tasks, dict):
            raise GCError(422, "INVALID_REQUEST", "tasks must map function UUIDs to lists of payloads")
        group = str(body.get("task_group_id") or uuid.uuid4())
        publish = None
        if body.get("create_queue") and publisher is not None:
            try:
                publish = publisher_for(who[0], group)
            except Exception as exc:  # noqa: BLE001 - the broker is down or refuses: say so
                raise GCError(503, "AMQP_UNAVAILABLE", f"the result broker is unavailable: {exc}") from None
        records, callbacks, answer = [], [], {}
        for fid, payloads in tasks.items():
            digest = function_digest(fid)
            if not isinstance(payloads, list) or not all(isinstance(p, str) for p in payloads):
                raise GCError(422, "INVALID_REQUEST", f"tasks[{fid}] must be a list of payload strings")
            ids = answer[fid] = []
            for p in payloads:
                tid, rec, done = submit(who[0], digest, p.encode(), publish)
                ids.append(tid)
                records.append(rec)
                callbacks.append(done)

        def enqueue() -> None:
            for rec, done in zip(records, callbacks):
                msg = m.Submit(name, [rec])
                session = (QUEUED_PREFIX if publish is not None else SESSION_PREFIX) + group
                manager.route(ev.ClientSubmitted(b"", who[0], session, msg, time.time(), done))

        manager.call_soon(enqueue)
        known = groups.setdefault(group, (who[0], []))
        if known[0] == who[0]:
            known[1].extend(t for ids in answer.values() for t in ids)
        while len(groups) > RECENT_TASKS // 10:
            groups.popitem(last=False)
        return {
            "request_id": str(uuid.uuid4()),
            "task_group_id": group,
            "endpoint_id": gc.endpoint_uuid(name),
            "tasks": answer,
        }

    def outcome(task_id: str, state: str, result: Any, error: Any, finished: Any) -> dict:
        status = GC_STATES.get(state, "waiting-for-ep")
        doc: dict[str, Any] = {"task_id": task_id, "status": status}
        if status == "success":
            doc["result"] = bytes(result).decode()
            doc["completion_t"] = str(finished or time.time())
        elif status == "failed":
            error = error or ["lost", f"task {state}", "", None]
            doc["exception"] = error[2] or error[1]
            doc["completion_t"] = str(finished or time.time())
        return doc

    def task_doc(who: tuple, task_id: str) -> dict:
        known = recent.get(task_id)
        if known is not None and (who[1] == "admin" or known[0] == who[0]) and known[1].done():
            res = known[1].result()
            state, result, error = res[m.R_STATE], res[m.R_PAYLOAD], res[m.R_ERROR]
            finished = time.time()
        else:
            try:
                raw = uuid.UUID(task_id).bytes
            except ValueError:
                raise GCError(404, "TASK_NOT_FOUND", f"task {task_id} not found") from None
            t = tasks_table
            with engine.connect() as conn:
                columns = (t.c.owner, t.c.state, t.c.result, t.c.error, t.c.t_finished)
                row = conn.execute(sa.select(*columns).where(t.c.task_id == raw)).first()
            if row is None or (who[1] != "admin" and row.owner != who[0]):
                if known is not None and known[0] == who[0]:  # submitted, not yet written
                    return {"task_id": task_id, "status": "waiting-for-ep"}
                raise GCError(404, "TASK_NOT_FOUND", f"task {task_id} not found")
            state, result, error, finished = row.state, row.result, unpack_error(row.error), row.t_finished
        return outcome(task_id, state, result, error, finished)

    @app.get("/v2/tasks/{task_id}")
    def get_task(task_id: str, who: User):
        return task_doc(who, task_id)

    @app.post("/v2/batch_status")
    def batch_status(who: User, body: JSONBody):
        ids = body.get("task_ids")
        if not isinstance(ids, list):
            raise GCError(422, "INVALID_REQUEST", "task_ids must be a list")
        results = {}
        for tid in ids:
            try:
                results[tid] = task_doc(who, str(tid))
            except GCError:
                results[tid] = {"task_id": tid, "status": "unknown", "reason": "task not found"}
        return {"response": "batch", "results": results}

    @app.get("/v2/endpoints/{endpoint_uuid}/status")
    def endpoint_status(endpoint_uuid: str, who: User):
        name, online = endpoint_name(endpoint_uuid)
        return {"status": "online" if online else "offline", "details": {"name": name}}

    @app.get("/v2/taskgroup/{group_id}")
    def taskgroup(group_id: str, who: User):
        # submitted lately: from memory; committed: from the store (after a restart too)
        owner, ids = groups.get(group_id, (who[0], []))
        if owner != who[0] and who[1] != "admin":
            raise GCError(404, "TASK_GROUP_NOT_FOUND", f"task group {group_id} not found")
        t = tasks_table
        sessions = [SESSION_PREFIX + group_id, QUEUED_PREFIX + group_id]
        query = sa.select(t.c.task_id).where(t.c.client_session.in_(sessions))
        if who[1] != "admin":
            query = query.where(t.c.owner == who[0])
        with engine.connect() as conn:
            stored = [str(uuid.UUID(bytes=r[0])) for r in conn.execute(query.order_by(t.c.t_received))]
        seen = set(stored)
        ids = stored + [tid for tid in ids if tid not in seen]
        return {"taskgroup_id": group_id, "tasks": [{"id": t} for t in ids]}

    @app.get("/v2/get_amqp_result_connection_url")
    def amqp_connection(who: User):
        if publisher is None:
            message = "AMQP not configured: this manager has no result broker (serve --globus-compute-amqp)"
            raise GCError(503, "AMQP_NOT_CONFIGURED", message)
        try:
            return publisher.connection_info(who[0])
        except Exception as exc:  # noqa: BLE001 - the broker's management API is down or refuses
            raise GCError(503, "AMQP_UNAVAILABLE", f"the result broker is unavailable: {exc}") from None

    if publisher is not None:
        _recover(manager, publisher, publisher_for, result_callback, outcome, published_until)
    return app


def _recover(manager, publisher, publisher_for, result_callback, outcome, published_until) -> None:
    """After a (re)start: unfinished GC tasks publish their result when it comes; results that
    finished since the last confirmed publish are published again."""
    since = published_until if published_until is not None else time.time() - REPUBLISH_AFTER_CRASH_S
    t = tasks_table
    columns = (t.c.task_id, t.c.owner, t.c.client_session, t.c.state, t.c.result, t.c.error, t.c.t_finished)
    unfinished = sa.or_(t.c.state.not_in(TERMINAL), t.c.t_finished >= since)
    query = sa.select(*columns).where(t.c.client_session.like(QUEUED_PREFIX + "%"), unfinished)
    with manager.store.engine.connect() as conn:
        rows = conn.execute(query).all()
    if not rows:
        return
    callbacks = {}
    for row in rows:
        publish = publisher_for(row.owner, row.client_session[len(QUEUED_PREFIX) :], declare=False)
        tid = str(uuid.UUID(bytes=row.task_id))
        if row.state in TERMINAL:
            doc_error = unpack_error(row.error)
            publish(tid, m.result_record(row.task_id, row.state, row.result, doc_error))
        else:
            callbacks[row.task_id] = result_callback(tid, None, publish)
    log.info(
        "GC/AMQP: %d results published again, %d unfinished tasks watched",
        len(rows) - len(callbacks),
        len(callbacks),
    )

    def attach() -> None:  # on the loop, before anything an endpoint resends is handled
        for task_id, done in callbacks.items():
            if task_id in manager.router.tasks:
                manager.router.callbacks[task_id] = done
            else:  # finished in between: publish what the store has once it is committed
                manager.store.after_commit(lambda t=task_id, d=done: _from_store(manager, t, d))

    manager.call_soon(attach)


def _from_store(manager: Any, task_id: bytes, done: Any) -> None:
    t = tasks_table
    query = sa.select(t.c.state, t.c.result, t.c.error).where(t.c.task_id == task_id)
    with manager.store.engine.connect() as conn:
        row = conn.execute(query).first()
    if row is not None and row.state in TERMINAL:
        done(m.result_record(task_id, row.state, row.result, unpack_error(row.error)))
