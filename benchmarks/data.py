"""Inputs and outputs by reference vs by value (issue 16, items 3 and 4): a large input, first and
repeated call, and a large output, same run.

    .venv/bin/python benchmarks/data.py            # 200 MiB both ways, then 1 GiB by reference
    .venv/bin/python benchmarks/data.py --quick    # 16 MiB both ways, results checked (< 20 s)

One ``dlhub up`` stack (manager, endpoint ``local``, 2 workers) on 127.0.0.1. The function run
hashes its input (sha256) and returns the digest and size, so both ways do the same work on the
worker: by value it gets ``bytes`` (pickled into the task, through manager and endpoint), by
reference a local path it reads in 1 MiB pieces (``File``: hashed and uploaded once by the client,
staged once into the endpoint's data cache by the worker, then found there).

- ``first`` / ``repeat``: wall time of ``submit(...).result()`` in the client, by value and by
  reference (first: hash + upload + stage; repeat: median of the next calls, the same file:
  nothing is uploaded or fetched again);
- ``chain``: two calls chained on a large intermediate output (``produce`` then ``hash_input``):
  returned as ``File(path)`` and left at the endpoint (``outputs="endpoint"``: kept in its data
  cache, the second call finds it by digest), returned as ``File(path)`` and also stored at the
  manager (the default: the worker uploads it, the second call still finds it at the endpoint)
  vs returned as bytes and sent back by value through the client;
- ``output``: a large output stored at the manager then ``download()``-ed by the client vs
  returned by value (bytes in the result), other bytes than the chain's (nothing held before);
- ``big``: the 1 GiB input by reference, first call (not by value: over the 256 MB payload limit);
- ``peak_rss_mib``: each process's peak RSS (``VmHWM``) after the by-reference calls, after the
  outputs by reference (stored, downloaded, chained) and again after the by-value ones (manager,
  endpoint, each worker; the client's ``ru_maxrss``).

Every result is checked (digest and size) and the data cache must hold the file once; a wrong
one exits 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

from _stack import marked, median, run_bench

FULL = {"mib": 200, "repeats": 5, "big_mib": 1024}
QUICK = {"mib": 16, "repeats": 2, "big_mib": 0}


def hash_input(x):
    """sha256 and size of bytes (by value) or of the file at a path (by reference)."""
    import hashlib

    h = hashlib.sha256()
    if isinstance(x, bytes):
        h.update(x)
        return h.hexdigest(), len(x)
    size = 0
    with open(x, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def produce(mib, by_reference, seed=None):
    """A large intermediate output: ``mib`` MiB of seeded random bytes, as bytes or as a File."""
    import os
    import random
    import tempfile

    rng = random.Random(mib if seed is None else seed)
    if not by_reference:
        return b"".join(rng.randbytes(1 << 20) for _ in range(mib))
    from dlhub.executor import File

    fd, path = tempfile.mkstemp(suffix=".out")
    with os.fdopen(fd, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(1 << 20))
    return File(path)


def make_file(path: Path, mib: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def peak_rss(stack) -> dict[str, float]:
    """Peak RSS (MiB) of each process of the stack, by role, and of this client."""
    out = {"client": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    workers = 0
    for pid in marked(str(stack.home)):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
        if "dlhub.endpoint.worker" in cmdline:
            role, workers = f"worker{workers}", workers + 1
        elif "dlhub.endpoint.pool" in cmdline:
            role = "pool"
        elif "dlhub-manager" in cmdline or "dlhub.manager" in cmdline:
            role = "manager"
        elif "endpoint" in cmdline and "start" in cmdline:
            role = "endpoint"
        else:
            continue
        out[role] = max(out.get(role, 0.0), round(hwm / 1024, 1))
    return out


def seeded_digest(rng, mib: int) -> str:
    """The hex sha256 of what ``produce`` writes, hashed 1 MiB at a time (the client's peak RSS
    then shows what downloads cost, not this)."""
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(rng.randbytes(1 << 20))
    return h.hexdigest()


def timed_call(ex, fn, arg) -> tuple[float, tuple]:
    t = time.perf_counter()
    result = ex.submit(fn, arg).result(600)
    return time.perf_counter() - t, tuple(result)


def measure(stack, sizes, emit, args) -> None:
    from dlhub.executor import File

    stack.up()
    ex, mib, problems = stack.ex, sizes["mib"], []
    src = stack.home / "input.bin"
    want = (make_file(src, mib), mib << 20)
    data_index = stack.home / "endpoints" / "local" / "data" / "index.json"

    def check(what: str, got: tuple) -> None:
        if got != want:
            problems.append(f"{what}: got {got}, want {want}")

    # by reference: first call (hash, upload, stage), then repeats (nothing moves)
    first_ref, got = timed_call(ex, hash_input, File(src))
    check("by reference, first", got)
    repeats = []
    for _ in range(sizes["repeats"]):
        took, got = timed_call(ex, hash_input, File(src))
        check("by reference, repeat", got)
        repeats.append(took)
    repeat_ref = median(repeats)
    entry = json.loads(data_index.read_text())["entries"].get(want[0])
    if entry is None or entry["uses"] != 1 + sizes["repeats"]:
        calls = 1 + sizes["repeats"]
        problems.append(f"data cache entry after {calls} calls: {entry} (want one fetch, then hits)")
    emit("first", "by_reference", mib=mib, s=round(first_ref, 3))
    emit("repeat", "by_reference", mib=mib, s=round(repeat_ref, 4), n=len(repeats))
    rss_ref = peak_rss(stack)
    emit("peak_rss_mib", "after_by_reference", **rss_ref)

    big = sizes["big_mib"]
    if big:
        big_src = stack.home / "big.bin"
        big_want = (make_file(big_src, big), big << 20)
        took, got = timed_call(ex, hash_input, File(big_src))
        if got != big_want:
            problems.append(f"1 GiB by reference: got {got}, want {big_want}")
        emit("big_first", "by_reference", mib=big, s=round(took, 3), mib_per_s=round(big / took, 1))
        took, got = timed_call(ex, hash_input, File(big_src))
        emit("big_repeat", "by_reference", mib=big, s=round(took, 3))
        big_src.unlink()
        emit("peak_rss_mib", "after_big_by_reference", **peak_rss(stack))

    # a large output stored at the manager, then downloaded, vs returned by value (other bytes
    # than the chain's: nothing is held at the manager before)
    import random

    rng = random.Random(mib + 1)
    fresh = seeded_digest(rng, mib)
    target = stack.home / "downloaded.bin"
    t = time.perf_counter()
    out = ex.submit(produce, mib, True, mib + 1).result(600)
    stored = time.perf_counter() - t
    out.download(target)
    took_ref = time.perf_counter() - t
    if out.at != "manager" or hash_input(str(target)) != (fresh, mib << 20):
        problems.append(f"output stored then downloaded: {out!r}, {hash_input(str(target))}")
    target.unlink()

    # two calls chained on a large intermediate output: by reference (it stays at the endpoint)
    # vs through the client (returned by value, sent back by value)
    rng = random.Random(mib)
    chained = seeded_digest(rng, mib)
    for system, by_ref, outputs in (
        ("by_reference", True, "endpoint"),
        ("by_reference_stored", True, "manager"),
        ("by_value", False, None),
    ):
        caller = ex.with_options(outputs=outputs) if outputs else ex
        if not by_ref:  # the manager streamed the stored outputs: its peak so far says how
            emit("peak_rss_mib", "after_outputs_by_reference", **peak_rss(stack))
        t = time.perf_counter()
        middle = caller.submit(produce, mib, by_ref).result(600)
        got = tuple(ex.submit(hash_input, middle).result(600))
        took = time.perf_counter() - t
        if got != (chained, mib << 20):
            problems.append(f"chain {system}: got {got}, want {(chained, mib << 20)}")
        del middle
        emit("chain", system, mib=mib, s=round(took, 3))

    t = time.perf_counter()
    value = ex.submit(produce, mib, False, mib + 1).result(600)
    took_val = time.perf_counter() - t
    if hash_input(value) != (fresh, mib << 20):
        problems.append("output by value: wrong bytes")
    del value
    emit("output", "stored_then_downloaded", mib=mib, s=round(took_ref, 3), stored_s=round(stored, 3))
    emit("output", "by_value", mib=mib, s=round(took_val, 3))

    # by value: the bytes travel inside every task
    payload = src.read_bytes()
    first_val, got = timed_call(ex, hash_input, payload)
    check("by value, first", got)
    repeats = []
    for _ in range(sizes["repeats"]):
        took, got = timed_call(ex, hash_input, payload)
        check("by value, repeat", got)
        repeats.append(took)
    repeat_val = median(repeats)
    emit("first", "by_value", mib=mib, s=round(first_val, 3))
    emit("repeat", "by_value", mib=mib, s=round(repeat_val, 4), n=len(repeats))
    emit("peak_rss_mib", "after_by_value", **peak_rss(stack))
    emit(
        "ratio",
        "by_value/by_reference",
        first=round(first_val / first_ref, 2),
        repeat=round(repeat_val / repeat_ref, 1),
    )
    if problems:
        raise AssertionError("; ".join(problems))


def summary(records: list[dict]) -> str:
    by = {(r["metric"], r["system"]): r for r in records}
    lines = ["inputs by reference vs by value (same run, same stack)"]
    for metric in ("first", "repeat"):
        ref, val = by.get((metric, "by_reference")), by.get((metric, "by_value"))
        if ref and val:
            lines.append(
                f"  {metric:6} call, {ref['mib']} MiB: by value {val['s']:.3f} s, by reference "
                f"{ref['s']:.3f} s ({val['s'] / ref['s']:.1f}x)"
            )
    ref, val = by.get(("chain", "by_reference")), by.get(("chain", "by_value"))
    stored = by.get(("chain", "by_reference_stored"))
    if ref and val:
        lines.append(
            f"  two calls chained on a {ref['mib']} MiB intermediate: through the client {val['s']:.3f} s, "
            f"by reference left at the endpoint {ref['s']:.3f} s ({val['s'] / ref['s']:.1f}x)"
            + (
                f", stored at the manager too {stored['s']:.3f} s ({val['s'] / stored['s']:.1f}x)"
                if stored
                else ""
            )
        )
    ref, val = by.get(("output", "stored_then_downloaded")), by.get(("output", "by_value"))
    if ref and val:
        lines.append(
            f"  a {ref['mib']} MiB output: by value {val['s']:.3f} s, stored at the manager "
            f"{ref['stored_s']:.3f} s then downloaded, {ref['s']:.3f} s in all ({val['s'] / ref['s']:.2f}x)"
        )
    big = by.get(("big_first", "by_reference"))
    if big:
        again = by.get(("big_repeat", "by_reference"))
        lines.append(
            f"  {big['mib']} MiB by reference: first call {big['s']:.1f} s ({big['mib_per_s']} MiB/s "
            f"end to end), repeat {again['s']:.2f} s"
        )
    for key in (
        "after_by_reference",
        "after_big_by_reference",
        "after_outputs_by_reference",
        "after_by_value",
    ):
        rss = by.get(("peak_rss_mib", key))
        if rss:
            fields = {k: v for k, v in rss.items() if k not in ("bench", "system", "metric")}
            lines.append(f"  peak RSS MiB {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(fields.items())))
    error = by.get(("error", "stack"))
    if error:
        lines.append(f"  FAILED: {error['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_bench("data", __doc__, FULL, QUICK, measure, summary))
