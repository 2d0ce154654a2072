"""REST routes for data sets and uploads, installed on the API's app by ``create_app``.

    POST /api/v1/uploads {size, sha256}           begin a (resumable) upload; 200 complete at
    GET  /api/v1/uploads/{id}                      once when the blob is already stored
    PUT  /api/v1/uploads/{id}?offset=N  (bytes)    one chunk; 409 with ``expected`` on a wrong offset
    POST /api/v1/uploads/{id}/complete             sha256 checked, then into the blob store
    POST /api/v1/datasets {record, visibility, owner}      publish (ready at once)
    GET  /api/v1/datasets?q=...                    search (kind=dataset)
    GET  /api/v1/datasets/{owner}/{name}[?version=]        describe, with the servables using it
    GET  /api/v1/datasets/{owner}/{name}/files/{path}      the file, streamed (``X-Sha256``)
    POST /api/v1/refs {ref: "owner/name[:v]/path"} | {sha256}   a reference for a task argument
                                                   (issue 16 item 3): digest, size, blob URL and
                                                   a read grant; "not found" for what the caller
                                                   may not read
    GET  /api/v1/blobs/{sha256}?grant=...          the bytes, for the endpoint staging them (the
                                                   grant is the only credential it takes)
    POST /api/v1/outputs/grant                     an upload grant for the caller (issue 16 item
                                                   4): the endpoint that runs the caller's calls
                                                   stores a returned File(path) with it
    POST /api/v1/outputs?grant=&sha256=&size=&name=   begin storing one output for the grant's
                                                   user (complete at once when they hold it)
    PUT  /api/v1/outputs/{id}?grant=  (bytes)      the whole file, streamed (no bearer token, not
                                                   buffered: ``bodies.BoundedBodies`` lets it by);
                                                   sha256 checked, then held by the grant's user;
                                                   any failure discards the upload

Visibility is the servables' (one name space): a private data set the caller may not see is
"there is no data set owner/name" on every route. ``ApiError`` and the app's dependencies are
passed in (this module imports nothing from ``api``: the import graph stays acyclic).
"""

import asyncio
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from dlhub.protocol.refs import DATAREF
from dlhub.protocol.servable import VISIBILITIES, RecordError

from .datasets import get_dataset, linked_servables, publish_dataset
from .files import GRANT_TTL_S, MAX_FILE_BYTES, DigestMismatch, FileStore, OffsetMismatch, UploadError
from .repository import NotFound


class RefByName(BaseModel):
    """A data set file, ``owner/name[:v]/path``."""

    model_config = ConfigDict(extra="forbid")
    ref: str = Field(max_length=1000, pattern=re.sub(r"\(\?P<\w+>", "(", DATAREF.pattern))


class RefByDigest(BaseModel):
    """A file the caller uploaded, by digest."""

    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"
# the OpenAPI description of a raw byte body (upload chunks, outputs), read from the request stream
BINARY = {"schema": {"type": "string", "format": "binary"}}
BINARY_BODY = {"requestBody": {"content": {"application/octet-stream": BINARY}}}
OUTPUT_PIECE_BYTES = 4 << 20  # an output's bytes are written to the upload in pieces of this size


def install(app: Any, ctx: dict[str, Any]) -> None:
    from fastapi import Body, Depends, Path, Query, Request
    from fastapi.responses import FileResponse

    from dlhub.protocol.search import SearchQuery

    ApiError = ctx["ApiError"]
    API, User, repository = ctx["API"], ctx["User"], ctx["repository"]
    viewer_of, publish_owner, shares_of = ctx["viewer_of"], ctx["publish_owner"], ctx["shares_of"]
    search_parameters, max_version = ctx["search_parameters"], ctx["MAX_VERSION"]
    store = FileStore(repository.blobs)
    app.state.files = store
    UploadId = Annotated[str, Path(pattern=UPLOAD_ID_PATTERN, description="the upload's id")]

    # ---- uploads ------------------------------------------------------------------------------

    def upload_call(fn, *args):
        try:
            return fn(*args)
        except OffsetMismatch as exc:
            raise ApiError(409, "offset-mismatch", str(exc), expected=exc.expected) from None
        except DigestMismatch as exc:
            raise ApiError(422, "digest-mismatch", str(exc)) from None
        except UploadError as exc:
            raise ApiError(422, "invalid-request", str(exc)) from None

    @app.post(f"{API}/uploads")
    async def begin_upload(
        who: User,
        size: Annotated[int, Body(ge=0, le=MAX_FILE_BYTES)],
        sha256: Annotated[str, Body(pattern=r"^sha256:[0-9a-f]{64}$")],
    ) -> dict[str, Any]:
        """Start a resumable upload of one file of ``size`` bytes and digest ``sha256:<hex>``.
        ``complete: true`` at once when the manager already stores those bytes."""
        return await asyncio.to_thread(upload_call, store.begin, who[0], size, sha256)

    @app.get(f"{API}/uploads/{{upload_id}}")
    def upload_status(who: User, upload_id: UploadId) -> dict[str, Any]:
        """How many bytes were received (resume from ``offset``)."""
        return store.status(who[0], upload_id)

    @app.put(
        f"{API}/uploads/{{upload_id}}",
        openapi_extra=BINARY_BODY,
    )
    async def upload_chunk(
        who: User, upload_id: UploadId, request: Request, offset: Annotated[int, Query(ge=0)]
    ) -> dict[str, Any]:
        """The next chunk (raw bytes, up to 32 MiB) at ``offset``, the bytes received so far."""
        body = await request.body()
        return await asyncio.to_thread(upload_call, store.append, who[0], upload_id, offset, [body])

    @app.post(f"{API}/uploads/{{upload_id}}/complete")
    async def upload_complete(who: User, upload_id: UploadId) -> dict[str, Any]:
        """Check the sha256 of the whole file (422 ``digest-mismatch``: discarded) and store it."""
        return await asyncio.to_thread(upload_call, store.finish, who[0], upload_id)

    # ---- data sets --------------------------------------------------------------------------

    @app.post(f"{API}/datasets", status_code=201)
    async def publish(
        who: User,
        record: Annotated[dict[str, Any], Body()],
        visibility: Annotated[str | None, Body()] = None,
        owner: Annotated[str | None, Body()] = None,
    ) -> dict[str, Any]:
        """Publish a data set version: its record (files stored here must be uploaded first)."""
        publisher = publish_owner(who, owner)
        if record.get("owner") or record.get("version"):
            raise ApiError(422, "invalid-record", "owner and version are set by the manager; leave them out")
        if visibility is not None and visibility not in VISIBILITIES:
            raise ApiError(422, "invalid-request", f"visibility must be public or private: {visibility!r}")
        published = await asyncio.to_thread(
            lambda: publish_dataset(
                repository, publisher, record, visibility=visibility, holds=lambda d: store.holds(who[0], d)
            )
        )
        size = published.size
        return {"ref": published.ref, "status": "ready", "files": len(published.files), "size": size}

    Search = Annotated[SearchQuery, Depends(search_parameters(Query))]

    @app.get(f"{API}/datasets")
    def search(search: Search, who: User) -> dict[str, Any]:
        """Search data sets (the servables' parameters; ``kind`` is always dataset here)."""
        keywords = {**search.keywords(), "kind": "dataset"}
        hits = repository.search(SearchQuery(**keywords), viewer=viewer_of(who))
        return {"results": hits, "count": len(hits)}

    def find(who, owner: str, name: str, version: int | None):
        ref = f"{owner}/{name}" + (f":{version}" if version else "")
        try:
            return get_dataset(repository, ref, viewer_of(who))
        except RecordError:
            raise NotFound(f"there is no data set {ref}") from None

    @app.get(f"{API}/datasets/{{owner}}/{{name}}")
    def describe(
        who: User, owner: str, name: str, version: Annotated[int | None, Query(ge=1, le=max_version)] = None
    ) -> dict[str, Any]:
        """The record (latest version unless ``version``), versions, and the servables that
        name it (``trained_on``/``validated_on``) which the caller may see."""
        rec = find(who, owner, name, version)
        access = repository.access(owner, name)
        mine = who[1] == "admin" or who[0] == owner
        return {
            "record": rec.model_dump(mode="json"),
            "status": "ready",
            "versions": repository.versions(owner, name, kind="dataset"),
            "visibility": access.visibility,
            "servables": linked_servables(repository, rec, viewer_of(who)),
            **({"shares": shares_of(access)} if mine else {}),
        }

    @app.get(f"{API}/datasets/{{owner}}/{{name}}/files/{{path:path}}")
    def download(
        who: User,
        owner: str,
        name: str,
        path: str,
        version: Annotated[int | None, Query(ge=1, le=max_version)] = None,
    ):
        """The file's bytes, streamed from the blob store, with ``X-Sha256`` (its digest). A file
        listed by location: 409 ``external-file`` with the location to fetch it from."""
        rec = find(who, owner, name, version)
        entry = rec.files.get(path)
        if entry is None:
            raise NotFound(f"{rec.ref} has no file {path!r}")
        if entry.location is not None:
            raise ApiError(
                409,
                "external-file",
                f"{rec.ref}/{path} is not stored by this manager: it is at {entry.location.describe()}",
                location=json.loads(entry.location.model_dump_json()),
                sha256=entry.sha256,
                size=entry.size,
            )
        blob = store.open_blob(entry.sha256)
        headers = {"X-Sha256": entry.sha256, "X-Dataset": rec.ref}
        return FileResponse(blob, media_type="application/octet-stream", headers=headers)

    # ---- references for task arguments (issue 16, item 3) -----------------------------------

    def reference(who, base_url: str, ref: str | None, sha256: str | None) -> dict[str, Any]:
        from dlhub.protocol.refs import parse_dataref

        if (ref is None) == (sha256 is None):
            raise ApiError(422, "invalid-request", "give exactly one of ref (owner/name[:v]/path) or sha256")
        if sha256 is not None:  # a File the caller uploaded: only its holders may read it
            if not store.holds(who[0], sha256) or not repository.blobs.has(sha256):
                raise NotFound(f"no stored file {sha256} uploaded by {who[0]}")
            size, name, location = store.open_blob(sha256).stat().st_size, None, None
        else:
            try:
                owner, name_, version, path = parse_dataref(ref)
            except ValueError as exc:  # the schema's pattern passed: a path outside the data set
                raise NotFound(str(exc)) from None
            rec = find(who, owner, name_, version)
            entry = rec.files.get(path)
            if entry is None:
                raise NotFound(f"{rec.ref} has no file {path!r}")
            sha256, size, name, location = entry.sha256, entry.size, path.rsplit("/", 1)[-1], entry.location
            ref = f"{rec.ref}/{path}"
            if location is not None and location.type != "https":
                raise ApiError(
                    409,
                    "external-file",
                    f"{ref} is at {location.describe()}: dlhub stages files stored by the manager "
                    "and https:// locations (a Globus Transfer stager is not built yet)",
                )
        out = {"sha256": sha256, "size": size, "name": name, "ref": ref}
        if location is not None:
            out["url"] = location.url  # fetched from there, checked against sha256
        else:
            out["url"] = f"{base_url.rstrip('/')}{API}/blobs/{sha256}"
            out["grant"] = store.grant(who[0], sha256)
            out["expires_s"] = GRANT_TTL_S
        return out

    @app.post(f"{API}/refs")
    def make_reference(
        who: User,
        request: Request,
        body: RefByName | RefByDigest,
    ) -> dict[str, Any]:
        """A task argument by reference: a data set file (``ref``) or a file the caller uploaded
        (``sha256``). Answers its digest, size, where the endpoint fetches it and a read grant
        for that digest (valid 24 h); 404 in the same words as a missing data set for one the
        caller may not see."""
        ref, sha256 = getattr(body, "ref", None), getattr(body, "sha256", None)
        return reference(who, str(request.base_url), ref, sha256)

    # ---- outputs by reference (issue 16, item 4) ---------------------------------------------

    @app.post(f"{API}/outputs/grant")
    def output_grant(who: User, request: Request) -> dict[str, Any]:
        """A grant to store this user's call outputs (a ``File`` a call returns) in the blob
        store, valid 24 h: the client sends it with its tasks, the endpoint uploads with it."""
        url = f"{str(request.base_url).rstrip('/')}{API}/outputs"
        return {"url": url, "grant": store.upload_grant(who[0]), "expires_s": GRANT_TTL_S,
                "max_bytes": MAX_FILE_BYTES}  # fmt: skip

    def granted(grant: str, name: str) -> str:
        user = store.check_upload_grant(grant)
        if user is None:
            raise ApiError(
                403,
                "access-denied",
                f"output {name}: the upload grant is wrong or expired (submit the call again)",
            )
        return user

    OutputName = Annotated[str, Query(max_length=255)]

    @app.post(f"{API}/outputs")
    async def begin_output(
        grant: Annotated[str, Query(max_length=400)],
        sha256: Annotated[str, Query(pattern=r"^sha256:[0-9a-f]{64}$")],
        size: Annotated[int, Query(ge=0, le=MAX_FILE_BYTES)],
        name: OutputName = "output",
    ) -> dict[str, Any]:
        """Begin storing a call's output for the grant's user (no body): an upload id, or
        ``complete`` when that user holds those bytes already."""
        user = granted(grant, name)
        return await asyncio.to_thread(upload_call, store.begin, user, size, sha256)

    @app.put(
        f"{API}/outputs/{{upload_id}}",
        openapi_extra=BINARY_BODY,
    )
    async def put_output(
        upload_id: UploadId,
        request: Request,
        grant: Annotated[str, Query(max_length=400)],
        name: OutputName = "output",
    ) -> dict[str, Any]:
        """The output's bytes, streamed whole (written in pieces as they arrive, hashed on the
        way), then checked against the declared sha256 and stored; on any failure (more bytes
        than declared, fewer, another digest, the sender gone) the upload is discarded."""
        user = granted(grant, name)
        offset = (await asyncio.to_thread(store.status, user, upload_id))["offset"]
        pieces, held = [], 0
        try:
            async for chunk in request.stream():
                pieces.append(chunk)
                held += len(chunk)
                if held >= OUTPUT_PIECE_BYTES:
                    offset = (
                        await asyncio.to_thread(upload_call, store.append, user, upload_id, offset, pieces)
                    )["offset"]
                    pieces, held = [], 0
            if pieces:
                await asyncio.to_thread(upload_call, store.append, user, upload_id, offset, pieces)
            return await asyncio.to_thread(upload_call, store.finish, user, upload_id)
        except BaseException:
            await asyncio.to_thread(store.discard, user, upload_id)
            raise

    @app.get(f"{API}/blobs/{{sha256}}")
    def blob(
        sha256: Annotated[str, Path(pattern=r"^sha256:[0-9a-f]{64}$")],
        grant: Annotated[str, Query(max_length=400)],
    ):
        """A stored file's bytes for a holder of a read grant for exactly this digest (the
        endpoint staging a task's input): no bearer token; a wrong or expired grant is 404."""
        store.check_grant(sha256, grant)
        path = store.open_blob(sha256)
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Sha256": sha256})
