"""evaluation.py's output: the summary printed after a run, the README tables (every value beside
its ratio to dlhub-on from the same run) and the PNG figures, all from the run's JSON records."""

from __future__ import annotations

from pathlib import Path

from _eval_peers import NAMES


def summary(records: list[dict]) -> str:
    lines = ["Evaluation against peers (ratios: system / dlhub-on, same run)"]
    lat = [r for r in records if r["metric"] == "latency"]
    base = {r["servable"]: r["p50_ms"] for r in lat if r["system"] == "dlhub-on"}
    systems = list(dict.fromkeys(r["system"] for r in lat))
    lines.append("p50 ms per servable (x dlhub-on):")
    lines.append("  " + "system".ljust(16) + "".join(n[:14].rjust(16) for n in NAMES))
    for s in systems:
        row = "  " + s.ljust(16)
        for n in NAMES:
            v = next((r["p50_ms"] for r in lat if r["system"] == s and r["servable"] == n), None)
            b = base.get(n)
            row += (f"{v:.2f} ({v / b:.1f}x)" if v is not None and b else "-").rjust(16)
        lines.append(row)
    for metric, key, field in (
        ("throughput", "concurrency", "calls_per_s"),
        ("memo", "share", "calls_per_s"),
        ("workers", "workers", "calls_per_s"),
        ("batch_sweep", "rows", "per_row_us"),
        ("cold_start", "workers", "seconds"),
    ):
        recs = [r for r in records if r["metric"] == metric]
        if not recs:
            continue
        lines.append(f"{metric} ({field} by {key}):")
        for s in dict.fromkeys(r["system"] for r in recs):
            lines.append(
                "  " + s.ljust(16) + "  ".join(f"{r[key]}: {r[field]}" for r in recs if r["system"] == s)
            )
    for r in records:
        if r["metric"] == "error":
            lines.append(f"FAILED {r['system']}: {r['error'].splitlines()[0][:300]}")
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    """The README tables: every value beside its ratio to dlhub-on from the same run."""
    out = []
    lat = [r for r in records if r["metric"] == "latency"]
    systems = list(dict.fromkeys(r["system"] for r in lat))
    base = {r["servable"]: r["p50_ms"] for r in lat if r["system"] == "dlhub-on"}
    out.append("| p50 / p99 ms (p50 x dlhub-on) | " + " | ".join(NAMES) + " |")
    out.append("|---" * (len(NAMES) + 1) + "|")
    for s in systems:
        cells = []
        for n in NAMES:
            r = next((r for r in lat if r["system"] == s and r["servable"] == n), None)
            b = base.get(n)
            cells.append(
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.1f} ({r['p50_ms'] / b:.1f}x)" if r and b else "-"
            )
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    for metric, key, field in (
        ("throughput", "concurrency", "calls_per_s"),
        ("batch_sweep", "rows", "per_row_us"),
        ("memo", "share", "calls_per_s"),
        ("workers", "workers", "calls_per_s"),
        ("cold_start", "workers", "seconds"),
    ):
        recs = [r for r in records if r["metric"] == metric]
        if not recs:
            continue
        keys = list(dict.fromkeys(r[key] for r in recs))
        ref = "dlhub" if metric == "cold_start" else "dlhub-on"
        base = {r[key]: r[field] for r in recs if r["system"] == ref}
        out += ["", f"| {metric}: {field} (x {ref}) by {key} | " + " | ".join(map(str, keys)) + " |"]
        out.append("|---" * (len(keys) + 1) + "|")
        for s in dict.fromkeys(r["system"] for r in recs):
            cells = []
            for k in keys:
                v = next((r[field] for r in recs if r["system"] == s and r[key] == k), None)
                b = base.get(k)
                cells.append("-" if v is None else f"{v} ({v / b:.2f}x)" if b else str(v))
            out.append(f"| {s} | " + " | ".join(cells) + " |")
    for r in records:
        if r["metric"] == "error":
            out += ["", f"- **{r['system']} failed**: {r['error'].splitlines()[0][:300]}"]
    return "\n".join(out)


def plots(records: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def series(metric, key, field):
        recs = [r for r in records if r["metric"] == metric]
        return {
            s: ([r[key] for r in recs if r["system"] == s], [r[field] for r in recs if r["system"] == s])
            for s in dict.fromkeys(r["system"] for r in recs)
        }

    lat = [r for r in records if r["metric"] == "latency"]
    if lat:
        systems = list(dict.fromkeys(r["system"] for r in lat))
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        for ax, field in zip(axes, ("p50_ms", "p99_ms")):
            w = 0.8 / len(systems)
            for i, s in enumerate(systems):
                vals = [
                    next((r[field] for r in lat if r["system"] == s and r["servable"] == n), 0) for n in NAMES
                ]
                ax.bar([j + i * w for j in range(len(NAMES))], vals, w, label=s)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(NAMES))], NAMES, rotation=30, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel(f"{field} (log)")
            ax.set_title(f"serial {field} per servable")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "eval-latency.png", dpi=90)
        plt.close(fig)
        written.append("eval-latency.png")
    for metric, key, field, xlog, fname, title in (
        (
            "throughput",
            "concurrency",
            "calls_per_s",
            True,
            "eval-throughput.png",
            "diabetes-rf calls/s vs concurrent callers",
        ),
        (
            "batch_sweep",
            "rows",
            "per_row_us",
            True,
            "eval-batching.png",
            "diabetes-rf: us per row vs rows per call",
        ),
        (
            "memo",
            "share",
            "calls_per_s",
            False,
            "eval-memo.png",
            "diabetes-rf calls/s vs share of repeated inputs",
        ),
        ("workers", "workers", "calls_per_s", False, "eval-workers.png", "diabetes-rf calls/s vs workers"),
        (
            "cold_start",
            "workers",
            "seconds",
            False,
            "eval-cold-start.png",
            "seconds from launch to first prediction",
        ),
    ):
        data = series(metric, key, field)
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s, (xs, ys) in data.items():
            ax.plot(xs, ys, marker="o", label=s)
        if xlog:
            ax.set_xscale("log", base=2)
        if metric in ("batch_sweep", "throughput"):
            ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(field)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        written.append(fname)
    return written
