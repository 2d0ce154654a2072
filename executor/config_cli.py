"""``dlhub config KEY``: print one value of the client config ``$DLHUB_HOME/config.json``.

For shell scripts and curl, so they read the same home as ``Executor()`` and ``Client()``::

    TOKEN=$(dlhub config token)
    URL=$(dlhub config rest-url)
"""

from __future__ import annotations

import json

import click

from .config import dlhub_home

KEYS = {"token": "token", "rest-url": "rest_url", "manager": "manager"}  # shown -> stored


def register(main: click.Group) -> None:
    @main.command("config")
    @click.argument("key", type=click.Choice(sorted(KEYS)))
    @click.option("--home", type=click.Path(file_okay=False), help="default $DLHUB_HOME or ~/.dlhub")
    def config(key: str, home: str | None) -> None:
        """Print KEY from the client config of `dlhub up`: token (the bearer token), rest-url
        (the REST API's base URL) or manager (the address Executors connect to)."""
        path = dlhub_home(home) / "config.json"
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            raise click.ClickException(
                f"no client config at {path}: run `dlhub up` (or set DLHUB_HOME)"
            ) from None
        except ValueError as exc:
            raise click.ClickException(f"{path} is not valid JSON: {exc}") from None
        value = stored.get(KEYS[key]) if isinstance(stored, dict) else None
        if not value:
            raise click.ClickException(f"{path} has no {KEYS[key]!r} (run `dlhub up` to write it)")
        click.echo(value)
