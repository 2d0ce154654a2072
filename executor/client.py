"""``Client``: the servable repository over the manager's REST API (the management plane).

    Client() --httpx, Bearer token--> manager REST API --> repository / task records

The URL and token come from ``$DLHUB_HOME/config.json`` (written by ``dlhub up``) unless given.
Errors come back as typed exceptions carrying the server's message: ``AccessDenied`` (401/403),
``NotFoundError`` (404), ``ValueError`` (400/422), ``EndpointRequired`` when several endpoints
could take a call that names none, ``DLHubError`` otherwise; ``publish`` raises ``PublishError``
when verification fails, and ``run`` raises the task's typed error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from dlhub.protocol import AccessDenied, DLHubError, EndpointRequired
from dlhub.protocol.errors import ERROR_TYPES, RemoteError, exception_from_record
from dlhub.protocol.search import SearchQuery
from dlhub.protocol.servable import parse_ref

if TYPE_CHECKING:
    from .dataset import Dataset
    from .servable import Servable

from ._progress import PublishProgress
from .config import dlhub_home, endpoint_from


class NotFoundError(DLHubError, LookupError):
    """The servable, version or task does not exist (or is not visible to you)."""

    code = "not-found"


class PublishError(DLHubError):
    """The published version failed verification (it never routes); ``ref`` and the reason."""

    code = "publish-failed"

    def __init__(self, ref: str, reason: str):
        super().__init__(f"{ref} failed verification: {reason}")
        self.ref, self.reason = ref, reason


class Client:
    """The repository: search, describe, versions, delete; task records by id."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        home: str | None = None,
        timeout_s: float = 30.0,
    ):
        stored: dict[str, Any] = {}
        path = dlhub_home(home) / "config.json"
        self._home: Path | None = path.parent if path.parent.is_dir() else None
        if path.exists():
            stored = json.loads(path.read_text())
        url = url or stored.get("rest_url")
        token = token or stored.get("token")
        if not url:
            raise ValueError(f"no REST URL: pass url=..., or run `dlhub up` (looked in {path})")
        self.url = url.rstrip("/")
        # for calls that name no endpoint: $DLHUB_ENDPOINT or the config's default_endpoint, else
        # None (the manager's default endpoint, else its only connected one)
        self.endpoint: str | None = endpoint_from(stored, "rest_url", self.url)
        self._http = httpx.Client(
            base_url=f"{self.url}/api/v1",
            # no token: no header (an empty "Bearer " is not a legal header value), and the
            # manager answers 401 saying a token is needed where one is
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=timeout_s,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.is_success:
            return response.json()
        self._raise(response)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DLHubError(f"cannot reach the dlhub REST API at {self.url}: {exc}") from None

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            body = response.json()
            message = body.get("message", response.text)
        except ValueError:
            body, message = {}, response.text
        code = body.get("code") if isinstance(body, dict) else None
        if code == "endpoint-required":
            reason = body.get("reason") or message
            raise EndpointRequired(reason, body.get("endpoints") or [], "pass endpoint=<name>")
        if code == "task-failed":
            remote_type, _, text = message.partition(": ")
            raise RemoteError(text or message, body.get("traceback") or "", remote_type)
        if code in ERROR_TYPES and code not in ("access-denied",):
            raise exception_from_record([code, message, "", None])
        if response.status_code in (401, 403):
            raise AccessDenied(message)
        if response.status_code == 404:
            raise NotFoundError(message)
        if response.status_code in (400, 422):
            raise ValueError(message)
        raise DLHubError(f"HTTP {response.status_code}: {message}")

    def whoami(self) -> str:
        """The user name of this client's token (the owner of what it publishes)."""
        return self._call("GET", "/whoami")["user"]

    def search(
        self,
        query: str = "",
        *,
        owner: str | None = None,
        domain: str | None = None,
        author: str | None = None,
        related: str | None = None,
        dataset: str | None = None,
        servable: str | None = None,
        only_latest: bool = True,
        limit: int = 20,
        kind: str = "servable",
    ) -> list[dict[str, Any]]:
        """Ranked metadata records of ready servables, or of data sets with ``kind="dataset"``
        (best first). ``dataset="owner/name[:v]"``: servables trained or validated on it;
        ``servable="owner/name[:v]"``: the data sets it names. The parameters are
        :class:`dlhub.protocol.search.SearchQuery`'s (a bad one: ``ValueError`` naming it, before
        any request)."""
        search = SearchQuery(
            query,
            owner=owner,
            domain=domain,
            author=author,
            related=related,
            dataset=dataset,
            servable=servable,
            only_latest=only_latest,
            limit=limit,
            kind=kind,
        )
        return self._call("GET", "/servables", params=search.to_params())["results"]

    def describe(self, ref: str, kind: str | None = None) -> dict[str, Any]:
        """``owner/name[:version]``: its record, status (and error if it failed), and versions;
        a servable's ``datasets`` or a data set's ``servables`` (the links between them).
        ``kind``: servable or dataset (None: whichever ``ref`` is)."""
        owner, name, version = parse_ref(ref)
        params = {"version": version} if version else {}
        if kind in (None, "servable"):
            response = self._request("GET", f"/servables/{owner}/{name}", params=params)
            if response.is_success:
                return {"type": "servable", **response.json()}
            if kind == "servable" or response.status_code != 404:
                self._raise(response)
        response = self._request("GET", f"/datasets/{owner}/{name}", params=params)
        if response.is_success:
            return {"type": "dataset", **response.json()}
        if kind is None and response.status_code == 404:
            raise NotFoundError(f"there is no servable or data set {ref}")
        self._raise(response)

    def versions(self, ref: str) -> list[dict[str, Any]]:
        """Every version of a servable (with its status), or of a data set."""
        owner, name, _ = parse_ref(ref)
        response = self._request("GET", f"/servables/{owner}/{name}/versions")
        if response.status_code == 404:
            found = self._request("GET", f"/datasets/{owner}/{name}")
            if found.is_success:
                return found.json()["versions"]
        if response.is_success:
            return response.json()["versions"]
        self._raise(response)

    def delete(self, ref: str) -> int:
        """Delete one version (``owner/name:3``) or all of them (``owner/name``); calls in flight
        finish, new calls are refused. Returns how many versions were deleted."""
        owner, name, version = parse_ref(ref)
        path = f"/servables/{owner}/{name}" + (f"/{version}" if version else "")
        return self._call("DELETE", path)["deleted"]

    # ---- visibility and sharing (the servable's owner, or an admin) -----------------------------

    def share(self, ref: str, users: Sequence[str] = (), groups: Sequence[str] = ()) -> dict[str, Any]:
        """Let ``users`` and the members of ``groups`` see and run ``owner/name`` (all its
        versions) while it is private. Returns its access: visibility, users, groups."""
        return self._access_change(ref, "share", users, groups)

    def unshare(self, ref: str, users: Sequence[str] = (), groups: Sequence[str] = ()) -> dict[str, Any]:
        """Take shares back: for those users (unless in a group it is still shared with) a
        private servable is "not found" again."""
        return self._access_change(ref, "unshare", users, groups)

    def set_visibility(self, ref: str, visibility: str) -> dict[str, Any]:
        """``"public"`` (anyone may find and run it) or ``"private"`` (its owner, admins, and the
        users and groups it is shared with)."""
        owner, name, _ = parse_ref(ref)
        return self._call("PUT", f"/servables/{owner}/{name}/visibility", json={"visibility": visibility})

    def access(self, ref: str) -> dict[str, Any]:
        """Visibility and shares of ``owner/name`` (owner and admins)."""
        owner, name, _ = parse_ref(ref)
        return self._call("GET", f"/servables/{owner}/{name}/access")

    def _access_change(self, ref: str, verb: str, users: Sequence[str], groups: Sequence[str]) -> dict:
        owner, name, _ = parse_ref(ref)
        if isinstance(users, str) or isinstance(groups, str):
            raise TypeError("users and groups are lists of names, e.g. users=['bob']")
        body = {"users": list(users), "groups": list(groups)}
        return self._call("POST", f"/servables/{owner}/{name}/{verb}", json=body)

    def publish(
        self,
        servable: Servable,
        *,
        endpoint: str | None = None,
        wait: bool = True,
        timeout_s: float = 600.0,
        owner: str | None = None,
        progress: bool = False,
    ) -> str:
        """Upload, then (``wait``) block until the manager has verified the new version on an
        endpoint: returns ``owner/name:version`` once it is ready, raises :class:`PublishError`
        if its examples fail or it does not load, ``TimeoutError`` if no verdict in time.
        ``progress=True``: say on stderr what it waits for (the upload, then the verification on
        its endpoint, with the version's status and the elapsed time).
        ``owner``: publish for another owner than this token's user (admins only, else
        ``AccessDenied``), e.g. ``"examples"``."""
        servable.validate()
        files = [("files", (path, data, "application/octet-stream")) for path, data in servable.files.items()]
        form: dict[str, Any] = {"record": json.dumps(servable.record)}
        endpoint = endpoint or self.endpoint
        if endpoint:
            form["endpoint"] = endpoint
        if owner:
            form["owner"] = owner
        if servable.visibility is not None:
            form["visibility"] = servable.visibility
        shown = PublishProgress(servable, enabled=progress)
        try:
            body = self._call("POST", "/servables", data=form, files=files or None)
            ref = body["ref"]
            shown.uploaded(ref, body.get("verifying_on"), wait)
            if not wait:
                return ref
            deadline = time.monotonic() + timeout_s
            delay = 0.05
            while True:
                info = self.describe(ref)
                if info["status"] == "ready":
                    shown.ready(ref)
                    return ref
                if info["status"] != "pending":
                    raise PublishError(ref, info.get("error") or info["status"])
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{ref} is still being verified on {body.get('verifying_on')} after "
                        f"{timeout_s:.0f} s (is that endpoint up?); check with Client().describe({ref!r})"
                    )
                shown.status(info["status"])
                time.sleep(delay)
                delay = min(delay * 1.5, 0.25)
        finally:
            shown.close()

    # ---- data sets -------------------------------------------------------------------------------

    def publish_dataset(self, dataset: Dataset, *, owner: str | None = None) -> str:
        """Upload the data set's local files (chunked, resumable, sha256 checked by the manager;
        files it already stores are not sent again), then publish its record: returns
        ``owner/name:version``, ready at once."""
        from .dataset import UploadState, upload

        dataset.validate()
        state = UploadState(self._home / "uploads.json" if self._home else None)
        for path, (digest, size) in sorted(dataset.digests().items()):
            upload(
                self._call,
                self._request,
                self._raise,
                dataset.local[path],
                digest,
                size,
                state,
                f"{self.url} {digest}",
            )
        body: dict[str, Any] = {"record": dataset.record}
        if dataset.visibility is not None:
            body["visibility"] = dataset.visibility
        if owner:
            body["owner"] = owner
        return self._call("POST", "/datasets", json=body)["ref"]

    def download(self, ref: str, file: str | None = None, to: str | os.PathLike = ".") -> list[Path]:
        """Download a data set's files (or one ``file``) under ``to``, streamed and checked
        against their sha256 (a mismatch leaves nothing behind). Files listed at an ``https``
        URL are fetched from it; those on an endpoint or in a Globus collection cannot be
        downloaded through the manager (``DLHubError`` saying where they are)."""
        from dlhub.protocol.dataset import parse_dataset

        from .dataset import stream_to

        info = self.describe(ref, kind="dataset")
        rec = info["record"]
        parse_dataset(rec)  # paths relative and inside the folder, digests well-formed: else RecordError
        files = rec["files"]
        if file is not None and file not in files:
            raise NotFoundError(f"{rec['owner']}/{rec['name']}:{rec['version']} has no file {file!r}")
        root = Path(to)
        written = []
        for path in [file] if file is not None else sorted(files):
            entry, target = files[path], root / path
            what = f"{rec['owner']}/{rec['name']}:{rec['version']}/{path}"
            location = entry.get("location")
            if location is None:
                url = f"/datasets/{rec['owner']}/{rec['name']}/files/{quote(path, safe='/')}"
                stream = self._http.stream("GET", url, params={"version": rec["version"]})
            elif location["type"] == "https":
                timeout = self._http.timeout
                stream = httpx.stream("GET", location["url"], follow_redirects=True, timeout=timeout)
            else:
                where = (
                    f"on endpoint {location['endpoint']} at {location['path']}"
                    if location["type"] == "endpoint"
                    else f"in Globus collection {location['collection']} at {location['path']}"
                )
                raise DLHubError(f"{what} is {where}: fetch it there (sha256 {entry['sha256']})")
            try:
                with stream as response:
                    if not response.is_success:
                        response.read()
                        self._raise(response)
                    written.append(stream_to(response.iter_bytes(1 << 20), target, entry["sha256"], what))
            except httpx.TransportError as exc:
                raise DLHubError(f"cannot download {what}: {exc}") from None
        return written

    def run(
        self,
        ref: str,
        *args: Any,
        endpoint: str | None = None,
        timeout_s: float | None = None,
        wait_s: float = 300.0,
        **kwargs: Any,
    ) -> Any:
        """Run a servable over REST with JSON arguments and get its JSON result (the Executor is
        the fast path; this is for scripts and other languages). ``endpoint`` (also for
        ``publish``): default ``$DLHUB_ENDPOINT`` or ``default_endpoint`` in config.json, else the
        manager's default endpoint; :class:`EndpointRequired` when that is ambiguous."""
        owner, name, version = parse_ref(ref)
        endpoint = endpoint or self.endpoint
        body = {"args": list(args), "kwargs": kwargs, "version": version, "endpoint": endpoint}
        body.update({"wait_s": min(wait_s, 3600.0), "timeout_s": timeout_s})
        response = self._request("POST", f"/servables/{owner}/{name}/run", json=body)
        deadline = time.monotonic() + wait_s
        while response.status_code == 202:
            task_id = response.json()["task_id"]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} has no result after {wait_s} s; see Client().result()")
            time.sleep(0.1)
            response = self._request("GET", f"/tasks/{task_id}/result")
        if response.status_code == 200:
            return response.json()["result"]
        self._raise(response)

    def result(self, task_id: str) -> Any:
        """The JSON result of a task started over REST; ``None``-free: raises while it runs."""
        response = self._request("GET", f"/tasks/{task_id}/result")
        if response.status_code == 200:
            return response.json()["result"]
        if response.status_code == 202:
            raise TimeoutError(f"task {task_id} is {response.json().get('state')}: no result yet")
        self._raise(response)

    def task(self, task_id: str) -> dict[str, Any]:
        """A task's record: state, endpoint, timestamps, captured output."""
        return self._call("GET", f"/tasks/{task_id}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
