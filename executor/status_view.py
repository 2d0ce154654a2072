"""What ``dlhub status`` prints: turning the manager's status dict (and the example publisher's
state) into text, readable at 80 columns (rich). It reads no files and asks nothing of the manager:
``executor/cli.py`` does that, and calls :func:`print_status` and :func:`examples_line`."""

from __future__ import annotations

import time
from pathlib import Path

from dlhub.protocol import messages as m


def examples_line(state: dict, running: bool, log: Path) -> str | None:
    """How the background publishing of the example servables is going, from the state file
    the publisher keeps (``examples.json``, read into ``state``) and whether the publisher is
    still ``running``; None when `dlhub up` never started it."""
    if not state:
        return f"examples: starting (log: {log})" if running else None
    outcome = state.get("outcome") or {}
    failed = sum(1 for v in outcome.values() if v.startswith("failed"))
    skipped = sum(1 for v in outcome.values() if v.startswith("skipped"))
    line = f"examples: {len(outcome) - failed - skipped}/{state.get('total', '?')} published"
    line += f", {failed} failed" if failed else ""
    line += f", {skipped} skipped" if skipped else ""
    if state.get("finished"):
        return line + (f" (see {log})" if failed or skipped else "")
    if running and state.get("current"):
        since = time.time() - state.get("stage_since", time.time())
        return f"{line}, {state.get('stage', 'publishing')} {state['current']} ({since:.0f} s); log: {log}"
    if running:
        return f"{line}; log: {log}"
    return f"{line}; stopped before the end (the publisher is not running; log: {log})"


SERVABLE_COUNTERS = tuple((key, key.replace("_", " ")) for key in m.SERVABLE_STATS_KEYS)


def print_status(address: str, info: dict) -> None:
    """The human form of ``dlhub status``: one block per endpoint, readable at 80 columns, names
    never cut (users copy them into commands)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    grid = Table.grid(padding=(0, 2))
    grid.title, grid.title_justify, grid.title_style = f"manager: up at {address}", "left", "bold"
    grid.add_column(no_wrap=True, style="dim")
    grid.add_column()
    grid.add_row(
        "tasks", f"received {info['received']}, finished {info['finished']}, open {info['tasks_open']}"
    )
    database = _database_text(info.get("database"))
    if database:
        grid.add_row("database", database)
    cache = info.get("result_cache")
    if cache:
        ratio = f"{cache['hit_ratio']:.1%}" if cache.get("hit_ratio") is not None else "n/a"
        grid.add_row(
            "result cache",
            f"{cache['entries']} entries, {cache['bytes']:,} bytes, hits {cache['hits']}, "
            f"misses {cache['misses']} (hit ratio {ratio}), coalesced {cache['coalesced']}, "
            f"evicted {cache['evicted']}",
        )
    console.print(grid)
    for name, ep in sorted(info["endpoints"].items()):
        ep_info = ep.get("info") or {}
        grid = Table.grid(padding=(0, 2))
        grid.title, grid.title_justify, grid.title_style = f"endpoint {name}", "left", "bold"
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column()
        if ep.get("uuid"):
            grid.add_row("uuid", ep["uuid"])
        for key, value in _endpoint_rows(ep, ep_info):
            grid.add_row(key, value)
        console.print()
        console.print(grid)
        servables = ep_info.get("servables") or {}
        if servables:
            _print_servables(console, name, servables)
    beats = {ep["info"].get("heartbeat_s") for ep in info["endpoints"].values() if ep.get("info")}
    every = f" (every {beats.pop():g} s)" if len(beats) == 1 and None not in beats else ""
    console.print()
    console.print(
        f"[dim]'sent' is counted live by the manager; 'at endpoint' is the endpoint's own count at its "
        f"last heartbeat{every}, so for a moment it can show more queued than sent.[/]"
    )


def _database_text(health: dict | None) -> str | None:
    """The task store's writer, in one line: "ok", or how long its commit has been stuck (the
    manager keeps serving meanwhile: results flow, their acknowledgements wait)."""
    from rich.markup import escape

    if not isinstance(health, dict):
        return None  # a manager of an older version
    if health.get("state") != "stalled":
        return "ok"
    waiting = health.get("pending_writes", 0)
    text = f"[red]STALLED[/] for {health.get('stalled_for_s') or 0:.1f} s ({waiting} writes waiting"
    if health.get("last_error"):
        text += f"; last error: {escape(str(health['last_error']))}"
    return text + ")"


def _provider_lines(ep_info: dict) -> list[str]:
    """Per pool whose scheduler status command (sacct, squeue...) has hung longer than a heartbeat
    (the endpoint does not wait on it) or fails: one line each."""
    from rich.markup import escape

    beat = max(1.0, ep_info.get("heartbeat_s") or 0)
    out: list[str] = []
    provider = ep_info.get("provider")
    if not isinstance(provider, dict):  # plain data from the endpoint, of any shape
        return out
    for pool, query in sorted(provider.items()):
        if not isinstance(query, dict):
            continue
        running, ok_age = query.get("query_running_for_s"), query.get("last_ok_age_s")
        answered = f"last answer {_ago(ok_age)}" if isinstance(ok_age, (int, float)) else "no answer yet"
        pool = escape(str(pool))
        if isinstance(running, (int, float)) and running > beat:
            out.append(f"pool {pool}: [red]provider query hanging for {running:.0f} s[/] ({answered})")
        elif query.get("last_error"):
            out.append(f"pool {pool}: provider query failed: {escape(str(query['last_error']))} ({answered})")
    return out


def _endpoint_rows(ep: dict, ep_info: dict) -> list[tuple[str, str]]:
    """What a person asks of an endpoint: is it up, with how many workers, where are my tasks."""
    versions = f"Python {ep['versions'].get('python', '?')}, dill {ep['versions'].get('dill', '?')}"
    ago = ep.get("last_seen_s_ago")
    if ep["connected"]:
        rows = [("state", f"[green]connected[/] ({versions})")]
        rows.append(("workers", f"{ep_info.get('workers', 0)} ({ep_info.get('busy_workers', 0)} busy)"))
    else:
        heard = f", last heard {_ago(ago)}" if ago is not None else ""
        rows = [("state", f"[red]disconnected[/]{heard} ({versions})")]
    held = ep.get("held") or 0  # beyond their user's share in flight there (fair share)
    waiting, sent = ep["pending"] + held, ep["inflight"]
    tasks = f"{waiting} waiting at the manager, {sent} sent to the endpoint (no result yet)"
    if held:
        tasks += f"; {held} of those waiting are held for their user's fair share"
    rows.append(("tasks", tasks))
    queued, on_workers = ep_info.get("queued"), ep_info.get("on_workers")
    if on_workers is None and queued is not None:  # an endpoint of an older version
        on_workers = max(0, ep_info.get("outstanding", 0) - queued)
    if ep["connected"] and queued is not None:
        rows.append(
            ("at endpoint", f"{queued} queued for a worker, {on_workers} on workers (running or prefetched)")
        )
    if ep_info.get("received"):
        failed = ep_info.get("failed")
        rows.append(
            (
                "so far",
                f"received {ep_info['received']}, finished {ep_info.get('completed', 0)}"
                + (f" ({failed} failed)" if failed is not None else ""),
            )
        )
    if ep["connected"]:
        rows.extend(("provider", line) for line in _provider_lines(ep_info))
    batching = ep_info.get("batching") or {}
    if batching.get("batches"):
        delay = batching.get("queue_delay_ms") or {}
        rows.append(
            (
                "batching",
                f"{batching['batches']} batches, sizes {batching['batch_size_histogram']}, "
                f"queue delay mean {delay.get('mean')} ms, max {delay.get('max')} ms",
            )
        )
    return rows


def _print_servables(console, endpoint: str, servables: dict) -> None:
    """One endpoint's per-servable counters: a table when the full names fit beside the numbers,
    else one entry per servable."""
    from rich import box
    from rich.padding import Padding
    from rich.table import Table

    title = f"servables on endpoint {endpoint}"
    longest = max(len(label) for label in servables)
    digits = max((len(str(v)) for s in servables.values() for v in s.values()), default=1)
    # a counter column is as wide as its header's longest word (headers wrap), 2 apart
    needed = longest + 2 + sum(max(digits, *map(len, h.split())) + 3 for _, h in SERVABLE_COUNTERS)
    if needed <= console.width:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("servable", no_wrap=True, min_width=longest)
        for _, header in SERVABLE_COUNTERS:
            table.add_column(header, justify="right")
        for label, stats in sorted(servables.items()):
            table.add_row(label, *(str(stats.get(key, 0)) for key, _ in SERVABLE_COUNTERS))
        console.print(table)
        return
    console.print(f"[italic]{title}[/]")
    for label, stats in sorted(servables.items()):
        console.print(f"  {label}", soft_wrap=True)
        s = {key: stats.get(key, 0) for key, _ in SERVABLE_COUNTERS}
        counts = (
            f"loads {s['loads']}, evictions {s['evictions']}, output cache hits "
            f"{s['output_cache_hits']} / misses {s['output_cache_misses']}, "
            f"{s['batched_calls']} calls in {s['batches']} batches"
        )
        console.print(Padding(counts, (0, 0, 0, 4)))


def _ago(seconds: float) -> str:
    """``12 s ago``, ``3 min ago``, ``2.5 h ago``."""
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
