"""The repository from the shell: ``dlhub publish|search|describe|versions|run|delete`` and
``dlhub share|unshare|visibility``.

Each command is a thin layer over :class:`Client` (REST) or :class:`Executor` (``run``); errors
are one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import click

from dlhub.protocol import DLHubError, EndpointRequired
from dlhub.protocol.search import PARAMS, SearchQuery

HOME = click.option("--home", type=click.Path(file_okay=False), help="dlhub home (default $DLHUB_HOME)")
AS_JSON = click.option("--json", "as_json", is_flag=True, help="print JSON")


def _friendly(fn):
    """DLHub, value and lookup errors as a one-line message and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EndpointRequired as exc:  # worded for the shell, not for Python's endpoint=
            raise click.ClickException(f"EndpointRequired: {exc.reason}; name one with --endpoint") from None
        except (DLHubError, ValueError, LookupError, TimeoutError, OSError) as exc:
            message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise click.ClickException(f"{type(exc).__name__}: {message}") from None

    return wrapper


def _client(home: str | None):
    from .client import Client

    return Client(home=home)


def _json_arg(text: str) -> Any:
    """A JSON value if it parses as one (numbers, lists, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _echo_json(value: Any) -> None:
    from dlhub.protocol.serialize import _json_default

    click.echo(json.dumps(value, indent=2, default=_json_default))


def _load_function(source: str):
    path_text, sep, attr = source.rpartition(":")
    if not sep or not path_text.endswith(".py"):
        raise click.BadParameter("give FILE.py:FUNCTION", param_hint="SOURCE")
    path = Path(path_text).resolve()
    if not path.is_file():
        raise click.BadParameter(f"{path_text} does not exist", param_hint="SOURCE")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise click.BadParameter(f"{path.name} has no function {attr!r}", param_hint="SOURCE")
    return fn


def _search_options(fn):
    """``dlhub search``'s argument and options, one per :data:`dlhub.protocol.search.PARAMS`
    (the words an argument; ``--all-versions`` the inverse of ``only_latest``; bounds as there)."""
    for p in reversed(PARAMS):
        name, flag = p.cli_name, "--" + p.cli_name.replace("_", "-")
        if p.cli_argument:
            fn = click.argument(name, required=False, default=p.default)(fn)
        elif p.type is bool:
            default = not p.default if p.cli_inverted else p.default
            decls = (flag,) if p.cli_inverted else (f"{flag}/--no-{flag[2:]}",)
            fn = click.option(*decls, name, is_flag=True, default=default, help=p.cli_help or p.help)(fn)
        elif p.type is int:
            bounds = click.IntRange(p.minimum, p.maximum)
            fn = click.option(flag, name, default=p.default, show_default=True, type=bounds, help=p.help)(fn)
        else:
            fn = click.option(flag, name, default=p.default, type=p.type, help=p.help)(fn)
    return fn


def register(main: click.Group) -> None:
    @main.command()
    @click.argument("source")
    @click.option("--name", help="servable name (default: the function's, with - for _)")
    @click.option("--title", help="one-line title (default: the docstring's first line)")
    @click.option("--author", "authors", multiple=True, help='"Family, Given" (repeat for several)')
    @click.option("--description", default="")
    @click.option("--domain", "domains", multiple=True)
    @click.option("--keyword", "keywords", multiple=True)
    @click.option("--license", "license_", default=None)
    @click.option("--requirement", "requirements", multiple=True, help="pip specifier the endpoint must meet")
    @click.option(
        "--example",
        "examples",
        multiple=True,
        help="JSON [args, expected output], e.g. '[[\"NaCl\"], 2]' for count_atoms (repeat); "
        "run on the endpoint before it is ready",
    )
    @click.option("--deterministic", is_flag=True, help="same inputs give the same output (cacheable)")
    @click.option("--endpoint", help="endpoint that verifies it (default: the default endpoint, e.g. local)")
    @click.option("--no-wait", is_flag=True, help="return once uploaded, before verification")
    @click.option(
        "--private",
        is_flag=True,
        help="only you, admins and those you share it with (`dlhub share`) may find and run it",
    )
    @HOME
    @_friendly
    def publish(source, name, title, authors, description, domains, keywords, license_, requirements,
                examples, deterministic, endpoint, no_wait, private, home):  # fmt: skip
        """Publish FILE.py:FUNCTION as a servable; prints owner/name:version once verified.

        \b
        Example, with chem.py holding
            import re
            def count_atoms(formula):  # "Fe2O3" -> 5
                return sum(int(n or 1) for _, n in re.findall(r"([A-Z][a-z]?)(\\d*)", formula))
        run:
            dlhub publish chem.py:count_atoms --example '[["NaCl"], 2]' --domain chemistry
        """
        from .servable import Servable

        fn = _load_function(source)
        parsed = []
        for text in examples:
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise click.BadParameter(f"{text!r} is not JSON: {exc}", param_hint="--example") from None
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list)):
                raise click.BadParameter(f"{text!r} must be [args-list, output]", param_hint="--example")
            parsed.append({"args": value[0], "output": value[1]})
        client = _client(home)
        doc = (fn.__doc__ or "").strip().splitlines()
        servable = Servable.from_function(
            fn,
            name=name or fn.__name__.replace("_", "-").lower(),
            title=title or (doc[0] if doc else fn.__name__),
            authors=list(authors) or [client.whoami()],
            description=description,
            domains=domains,
            keywords=keywords,
            license=license_,
            requirements=requirements,
            examples=parsed,
            deterministic=deterministic,
            visibility="private" if private else None,
        )
        ref = client.publish(servable, endpoint=endpoint, wait=not no_wait, progress=True)  # on stderr
        click.echo(ref if not no_wait else f"{ref} (pending: see `dlhub describe {ref}`)")

    @main.command()
    @_search_options
    @AS_JSON
    @HOME
    @_friendly
    def search(as_json, home, **options):
        """Find ready servables (or data sets: --kind dataset) by words in their metadata, best
        match first."""
        search = SearchQuery.from_cli(options)
        hits = _client(home).search(**search.keywords())
        if as_json:
            _echo_json(hits)
            return
        if not hits:
            click.echo("no data sets found" if search.kind == "dataset" else "no servables found")
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(search.kind if search.kind == "servable" else "data set", "kind", "title", "domains")
        for hit in hits:
            ref = f"{hit['owner']}/{hit['name']}:{hit['version']}"
            kind = hit.get("kind") or f"{hit.get('file_count', 0)} files, {hit.get('size', 0):,} B"
            table.add_row(ref, kind, hit["title"], ", ".join(hit.get("domains", [])))
        Console().print(table)

    @main.command()
    @click.argument("ref")
    @AS_JSON
    @HOME
    @_friendly
    def describe(ref, as_json, home):
        """Metadata, status (and why it failed), inputs/outputs and versions of REF (a servable),
        or the files of REF (a data set); the data sets a servable names, the servables that
        name a data set."""
        info = _client(home).describe(ref)
        if as_json:
            _echo_json(info)
            return
        rec = info["record"]
        if info.get("type") == "dataset":
            _describe_dataset(info)
            return
        click.echo(f"{rec['owner']}/{rec['name']}:{rec['version']}  [{info['status']}]  {rec['title']}")
        if info.get("error"):
            click.echo(f"  error: {info['error']}")
        if rec.get("description"):
            click.echo(f"  {rec['description']}")
        click.echo(f"  kind: {rec['kind']}   authors: {'; '.join(a['name'] for a in rec['authors'])}")
        for i, spec in enumerate(rec.get("inputs", [])):
            click.echo(f"  input {i}: {_type_text(spec)}")
        click.echo(f"  output: {_type_text(rec['output'])}")
        if rec.get("steps"):
            click.echo(f"  steps: {' -> '.join(rec['steps'])}")
        if rec.get("requirements"):
            click.echo(f"  requirements: {', '.join(rec['requirements'])}")
        if rec.get("container"):
            click.echo(f"  container: {rec['container']}")
        click.echo(f"  examples: {len(rec.get('examples', []))}   deterministic: {rec.get('deterministic')}")
        for link in info.get("datasets") or []:
            click.echo(f"  {link['relation'].replace('_', ' ')}: {link['ref']} ({link['title']})")
        click.echo("  versions: " + ", ".join(f"{v['version']} ({v['status']})" for v in info["versions"]))
        if info.get("visibility"):
            line = f"  visibility: {info['visibility']}"
            shares = info.get("shares")
            if shares is not None:  # shown to the owner and admins
                users, groups = shares.get("users") or [], shares.get("groups") or []
                line += "   shared with: " + (
                    ", ".join([*users, *(f"group {g}" for g in groups)]) or "nobody"
                )
            click.echo(line)

    @main.command()
    @click.argument("ref")
    @AS_JSON
    @HOME
    @_friendly
    def versions(ref, as_json, home):
        """Every version of owner/name with its status."""
        rows = _client(home).versions(ref)
        if as_json:
            _echo_json(rows)
            return
        for row in rows:
            line = f"{row['version']:>4}  {row['status']:<8}"
            click.echo(line + (f"  {row['error']}" if row.get("error") else ""))

    @main.command()
    @click.argument("ref")
    @click.argument("args", nargs=-1)
    @click.option("--kwargs", "kwargs_json", default="{}", help="keyword arguments as a JSON object")
    @click.option("--endpoint", help="endpoint to run on (default: $DLHUB_ENDPOINT, else the default one)")
    @click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True)
    @HOME
    @_friendly
    def run(ref, args, kwargs_json, endpoint, timeout_s, home):
        """Run REF with ARGS (each parsed as JSON when it is JSON, else a string); prints the
        result as JSON."""
        from .executor import Executor

        try:
            kwargs = json.loads(kwargs_json)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--kwargs") from None
        if not isinstance(kwargs, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--kwargs")
        with Executor(endpoint=endpoint, home=home) as ex:
            value = ex.submit(ref, *[_json_arg(a) for a in args], **kwargs).result(timeout=timeout_s)
        _echo_json(value)

    @main.command()
    @click.argument("ref")
    @click.option("--yes", is_flag=True, help="do not ask")
    @HOME
    @_friendly
    def delete(ref, yes, home):
        """Delete a version (owner/name:3) or every version (owner/name). Calls in flight finish;
        new calls are refused."""
        if not yes:
            click.confirm(f"delete {ref}?", abort=True)
        count = _client(home).delete(ref)
        click.echo(f"deleted {count} version{'s' if count != 1 else ''} of {ref}")

    def _access_command(verb: str, doc: str):
        @main.command(name=verb, help=doc)
        @click.argument("ref")
        @click.option("--user", "users", multiple=True, help="a user name (repeat for several)")
        @click.option("--group", "groups", multiple=True, help="a group name (repeat for several)")
        @AS_JSON
        @HOME
        @_friendly
        def command(ref, users, groups, as_json, home):
            if not users and not groups:
                raise click.UsageError("name at least one --user or --group")
            client = _client(home)
            access = getattr(client, verb)(ref, users=list(users), groups=list(groups))
            _echo_access(access, as_json)

        return command

    _access_command(
        "share",
        "Let users and groups see and run OWNER/NAME while it is private, e.g.\n\n"
        "    dlhub share alice/secret-model --user bob --group chem",
    )
    _access_command(
        "unshare",
        "Take shares of OWNER/NAME back, e.g. `dlhub unshare alice/secret-model --user bob`.",
    )

    @main.command()
    @click.argument("ref")
    @click.argument("visibility", type=click.Choice(["public", "private"]))
    @AS_JSON
    @HOME
    @_friendly
    def visibility(ref, visibility, as_json, home):
        """Make OWNER/NAME public (anyone) or private (you, admins, and whom you share it with)."""
        _echo_access(_client(home).set_visibility(ref, visibility), as_json)

    from .dataset_cli import register as register_dataset_commands

    register_dataset_commands(main, HOME, _friendly, _client)


def _describe_dataset(info: dict) -> None:
    rec = info["record"]
    size = sum(f["size"] for f in rec["files"].values())
    click.echo(f"{rec['owner']}/{rec['name']}:{rec['version']}  [data set]  {rec['title']}")
    if rec.get("description"):
        click.echo(f"  {rec['description']}")
    click.echo(f"  authors: {'; '.join(a['name'] for a in rec['authors'])}   license: {rec.get('license')}")
    if rec.get("doi"):
        click.echo(f"  doi: {rec['doi']}")
    click.echo(f"  files: {len(rec['files'])}, {size:,} bytes")
    for path, f in sorted(rec["files"].items()):
        loc = f.get("location")
        where = (
            ""
            if loc is None
            else "  at "
            + (loc.get("url") or f"{loc.get('endpoint') or loc.get('collection')}:{loc.get('path')}")
        )
        click.echo(f"    {path}  {f['size']:,} B  {f['sha256'][:19]}...{where}")
    for link in info.get("servables") or []:
        click.echo(f"  used by: {link['ref']} ({link['relation'].replace('_', ' ')}, {link['status']})")
    click.echo("  versions: " + ", ".join(str(v["version"]) for v in info["versions"]))
    if info.get("visibility"):
        click.echo(f"  visibility: {info['visibility']}")


def _echo_access(access: dict, as_json: bool) -> None:
    if as_json:
        _echo_json(access)
        return
    for warning in access.get("warnings") or []:
        click.echo(f"warning: {warning}", err=True)
    shared = [*access.get("users", []), *(f"group {g}" for g in access.get("groups", []))]
    click.echo(f"{access['servable']}: {access['visibility']}, shared with {', '.join(shared) or 'nobody'}")


def _type_text(spec: dict) -> str:
    text = spec.get("type", "object")
    if spec.get("shape") is not None:
        text += f" shape {spec['shape']}"
    if spec.get("dtype"):
        text += f" {spec['dtype']}"
    return text + (f" - {spec['description']}" if spec.get("description") else "")
