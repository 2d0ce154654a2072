"""``Client``: the servable repository over the manager's REST API (the management plane).

    Client() --httpx, Bearer token--> manager REST API --> repository / task records

The URL and token come from ``$DLHUB_HOME/config.json`` (written by ``dlhub up``) unless given.
Errors come back as typed exceptions carrying the server's message: ``AccessDenied`` (401/403),
``NotFoundError`` (404), ``ValueError`` (400/422), ``DLHubError`` otherwise. Publishing and
running by name arrive with the rest of the repository work.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from dlhub.protocol import AccessDenied, DLHubError
from dlhub.protocol.servable import parse_ref

from .config import dlhub_home


class NotFoundError(DLHubError, LookupError):
    """The servable, version or task does not exist (or is not visible to you)."""

    code = "not-found"


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
        if path.exists():
            stored = json.loads(path.read_text())
        url = url or stored.get("rest_url")
        token = token or stored.get("token")
        if not url:
            raise ValueError(f"no REST URL: pass url=..., or run `dlhub up` (looked in {path})")
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {token or ''}"},
            timeout=timeout_s,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DLHubError(f"cannot reach the dlhub REST API at {self.url}: {exc}") from None
        if response.is_success:
            return response.json()
        try:
            body = response.json()
            message = body.get("message", response.text)
        except ValueError:
            message = response.text
        if response.status_code in (401, 403):
            raise AccessDenied(message)
        if response.status_code == 404:
            raise NotFoundError(message)
        if response.status_code in (400, 422):
            raise ValueError(message)
        raise DLHubError(f"HTTP {response.status_code}: {message}")

    def search(
        self,
        query: str = "",
        *,
        owner: str | None = None,
        domain: str | None = None,
        author: str | None = None,
        related: str | None = None,
        only_latest: bool = True,
        limit: int = 20,
    ) -> list[dict[str, Any]]:
        """Ranked metadata records of ready servables (best first)."""
        params: dict[str, Any] = {"q": query, "only_latest": only_latest, "limit": limit}
        for key, value in (("owner", owner), ("domain", domain), ("author", author), ("related", related)):
            if value:
                params[key] = value
        return self._call("GET", "/servables", params=params)["results"]

    def describe(self, ref: str) -> dict[str, Any]:
        """``owner/name[:version]``: its record, status (and error if it failed), and versions."""
        owner, name, version = parse_ref(ref)
        params = {"version": version} if version else {}
        return self._call("GET", f"/servables/{owner}/{name}", params=params)

    def versions(self, ref: str) -> list[dict[str, Any]]:
        owner, name, _ = parse_ref(ref)
        return self._call("GET", f"/servables/{owner}/{name}/versions")["versions"]

    def delete(self, ref: str) -> int:
        """Delete one version (``owner/name:3``) or all of them (``owner/name``); calls in flight
        finish, new calls are refused. Returns how many versions were deleted."""
        owner, name, version = parse_ref(ref)
        path = f"/servables/{owner}/{name}" + (f"/{version}" if version else "")
        return self._call("DELETE", path)["deleted"]

    def task(self, task_id: str) -> dict[str, Any]:
        """A task's record: state, endpoint, timestamps, captured output."""
        return self._call("GET", f"/tasks/{task_id}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
