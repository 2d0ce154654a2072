"""Endpoint policy: who may submit to an endpoint and what may run there.

The endpoint's admin writes it in config.yaml (``policy:``). The endpoint enforces it on every
task that arrives (the manager writes each task's origin: submitter, admin or not, groups, the
servable's owner) and sends it in its Hello, so the manager refuses before forwarding. Both sides
evaluate it with this class, so a refusal reads the same wherever it happens.

Rules: a task passes the *who* rule when its submitter is an admin, is in ``allowed_users``
(default: the endpoint's owner, the user whose token registered it; ``"*"``: anyone), or is in
one of ``allowed_groups``. The *what* rules hold for everyone, admins included (they are about
the site's hardware): ``functions_by_value: false`` runs only published servables, and
``allowed_servable_owners`` (default: any) limits whose servables run, verification included.
"""

from __future__ import annotations

from typing import Any

from .errors import AccessDenied
from .messages import package_key

ANY = "*"


class Policy:
    """One endpoint's policy, with its defaults resolved against the endpoint's owner."""

    __slots__ = ("endpoint", "owner", "users", "groups", "by_value", "servable_owners", "users_set")

    def __init__(
        self,
        endpoint: str,
        owner: str | None = None,
        allowed_users: list[str] | None = None,
        allowed_groups: list[str] | None = None,
        functions_by_value: bool = True,
        allowed_servable_owners: list[str] | None = None,
    ):
        self.endpoint, self.owner = endpoint, owner
        self.users_set = allowed_users is not None  # False: the default (the owner)
        self.users = frozenset(allowed_users if allowed_users is not None else [owner] if owner else [])
        self.groups = frozenset(allowed_groups or ())
        self.by_value = functions_by_value
        self.servable_owners = (
            None
            if allowed_servable_owners is None or ANY in allowed_servable_owners
            else frozenset(allowed_servable_owners)
        )

    @classmethod
    def from_wire(cls, endpoint: str, data: Any, owner: str | None) -> Policy:
        """The policy an endpoint sent in its Hello (``to_wire``); ValueError when malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"policy must be a mapping, got {type(data).__name__}")
        known = ("allowed_users", "allowed_groups", "functions_by_value", "allowed_servable_owners")
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(
                f"policy has unknown keys {sorted(unknown, key=repr)} (known: {', '.join(known)})"
            )
        for key in ("allowed_users", "allowed_groups", "allowed_servable_owners"):
            value = data.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"policy.{key} must be a list of names or nil")
        if not isinstance(data.get("functions_by_value", True), bool):
            raise ValueError("policy.functions_by_value must be true or false")
        return cls(endpoint, owner, **data)

    def to_wire(self) -> dict[str, Any]:
        """What the endpoint sends in its Hello: the rules as written (defaults left unresolved,
        since the manager knows the owner from the token)."""
        return {
            "allowed_users": sorted(self.users) if self.users_set else None,
            "allowed_groups": sorted(self.groups),
            "functions_by_value": self.by_value,
            "allowed_servable_owners": sorted(self.servable_owners) if self.servable_owners else None,
        }

    def describe(self) -> str:
        """The who rule in words, as the refusals quote it."""
        if ANY in self.users:
            users = ANY
        elif self.users_set:
            users = ", ".join(sorted(self.users)) or "nobody"
        else:
            users = f"not set, so only the endpoint's owner {self.owner or '(unknown)'}"
        groups = f"; policy.allowed_groups: {', '.join(sorted(self.groups))}" if self.groups else ""
        return f"policy.allowed_users: {users}{groups}"

    def refusal(self, origin: dict | None, function: str) -> str | None:
        """Why this task may not run here (None: it may). ``origin`` is the task's
        (``messages.task_origin``); ``function`` a code digest or ``servable:``/``verify:``."""
        if origin is None:
            return (
                f"endpoint {self.endpoint!r} cannot tell who submitted this task (the manager sent no "
                "origin: it is older than this endpoint), and its policy needs to"
            )
        user = origin.get("user")
        if not (
            origin.get("admin")
            or user in self.users
            or ANY in self.users
            or (self.groups and not self.groups.isdisjoint(origin.get("groups", ())))
        ):
            return f"{user} may not submit to endpoint {self.endpoint!r} ({self.describe()})"
        if package_key(function) is None:
            if not self.by_value:
                return (
                    f"endpoint {self.endpoint!r} does not run functions by value "
                    "(policy.functions_by_value: false); publish it as a servable"
                )
        elif self.servable_owners is not None and origin.get("owner") not in self.servable_owners:
            return (
                f"endpoint {self.endpoint!r} runs only servables of "
                f"{', '.join(sorted(self.servable_owners))} (policy.allowed_servable_owners), "
                f"not of {origin.get('owner')}"
            )
        return None

    def error(self, why: str) -> list:
        """The wire error record of a refusal (raised as ``AccessDenied`` by the caller)."""
        return [AccessDenied.code, why, "", None]
