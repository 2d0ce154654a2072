"""REST routes for who may see a servable, installed on the API's app by ``create_app``.

    GET  /api/v1/servables/{owner}/{name}/access        visibility and shares (owner, admins)
    POST /api/v1/servables/{owner}/{name}/share         {users, groups}: let them see and run it
    POST /api/v1/servables/{owner}/{name}/unshare       {users, groups}: take that back
    PUT  /api/v1/servables/{owner}/{name}/visibility    {"visibility": "public" | "private"}

A share naming a user or group nobody has (yet) is kept and said in ``warnings``. ``ApiError``
and the app's dependencies are passed in (this module imports nothing from ``api``: the import
graph stays acyclic).
"""

import re
from typing import Annotated, Any

import sqlalchemy as sa

from dlhub.protocol.servable import OWNER_PATTERN

from .repository import Access, NotFound, no_servable


def shares_of(access: Access) -> dict[str, list[str]]:
    return {"users": sorted(access.users), "groups": sorted(access.groups)}


def install(app: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Add the routes to ``app``; returns them by name (the web pages call them)."""
    from fastapi import Body

    ApiError, API, User = ctx["ApiError"], ctx["API"], ctx["User"]
    repository, engine, must_own = ctx["repository"], ctx["engine"], ctx["must_own"]
    Names = Annotated[list[str], Body()]  # users or groups, in the JSON body

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
        users: Names = [],  # noqa: B006 - FastAPI copies defaults
        groups: Names = [],  # noqa: B006
    ) -> dict[str, Any]:
        """Let ``users`` and members of ``groups`` see and run a private servable (owner, admins)."""
        must_own(who, owner, name)
        users, groups = principals(users, groups)
        body = access_body(owner, name, repository.share(owner, name, users, groups))
        warnings = unknown_principals(users, groups)
        return {**body, "warnings": warnings} if warnings else body

    @app.post(f"{API}/servables/{{owner}}/{{name}}/unshare")
    def unshare(
        who: User,
        owner: str,
        name: str,
        users: Names = [],  # noqa: B006 - FastAPI copies defaults
        groups: Names = [],  # noqa: B006
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

    return {"get_access": get_access, "share": share, "unshare": unshare, "set_visibility": set_visibility}
