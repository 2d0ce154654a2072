"""The three systems the roundtrip benchmark drives, behind one small interface.

Each system offers ``call(fn)`` (one task, blocking, returns its result), ``run_many(fn, n)``
(submit ``n``, then wait for all; raises unless every task returned ``fn()``), ``close()``, and
the attributes ``note`` and ``startup`` (extra startup figures).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from _raw_chain import RawChain

RESULT_TIMEOUT_S = 120  # a single task that takes longer than this is a hang
BIN = Path(sys.executable).parent


class RawSystem:
    """Pure pyzmq + msgpack chain; ``fn`` is only named, never shipped."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.chain = RawChain(workers)
        self.note = RawChain.note
        self.startup: dict = {}

    def call(self, fn):
        return self.chain.call(fn.__name__)

    def run_many(self, fn, n: int) -> None:
        self.chain.run_many(fn.__name__, n)  # checks that each task came back once, with fn()

    def close(self) -> None:
        self.chain.close()


class HtexSystem:
    """Parsl HighThroughputExecutor driven directly (no DataFlowKernel), LocalProvider."""

    def __init__(self, tmp: Path, workers: int) -> None:
        # interchange.py and process_worker_pool.py are found on PATH
        os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        provider = LocalProvider(
            init_blocks=1, min_blocks=0, max_blocks=1, worker_init=f"export PATH={BIN}:$PATH"
        )
        provider.script_dir = str(tmp / "submit_scripts")
        os.makedirs(provider.script_dir, exist_ok=True)
        self.ex = HighThroughputExecutor(
            label="htex_roundtrip",
            provider=provider,
            max_workers_per_node=workers,
            address="127.0.0.1",
        )
        self.ex.run_dir = str(tmp / "runinfo")
        self.ex.run_id = "roundtrip"
        self.note = (
            f"parsl {_parsl_version()} HighThroughputExecutor used directly (no DFK), "
            f"LocalProvider, {workers} workers, encrypted={self.ex.encrypted}, "
            f"prefetch_capacity={self.ex.prefetch_capacity} (Parsl defaults)"
        )
        self.startup = {}
        try:
            self.ex.start()
            self.ex.scale_out_facade(1)
        except BaseException:
            self.close()
            raise

    def call(self, fn):
        return self.ex.submit(fn, {}).result(timeout=RESULT_TIMEOUT_S)

    def run_many(self, fn, n: int) -> None:
        futures = [self.ex.submit(fn, {}) for _ in range(n)]
        check_results(fn, [fut.result(timeout=RESULT_TIMEOUT_S) for fut in futures])

    def close(self) -> None:
        try:
            job_ids = list(self.ex.blocks_to_job_id.values())
            if job_ids:
                self.ex.provider.cancel(job_ids)
        finally:
            self.ex.shutdown()


def check_results(fn, results: list) -> None:
    """Every task of a ``run_many`` returned what ``fn()`` returns here."""
    expected = fn()
    wrong = [i for i, r in enumerate(results) if r != expected]
    if wrong:
        raise AssertionError(
            f"{fn.__name__}: {len(wrong)} of {len(results)} results wrong "
            f"(task {wrong[0]} returned {results[wrong[0]]!r}, expected {expected!r})"
        )


def _parsl_version() -> str:
    import parsl

    return parsl.__version__


def dlhub_command() -> list[str]:
    """The ``dlhub`` console script next to this interpreter, else ``python -m``."""
    script = BIN / "dlhub"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dlhub.executor.cli"]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def dlhub_down(home: Path, timeout: float = 60) -> str | None:
    """Run ``dlhub down --home HOME``; return an error description or None."""
    log = home / "bench-dlhub-down.log"
    try:
        with open(log, "w") as out:
            subprocess.run(
                dlhub_command() + ["down", "--home", str(home)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=True,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"dlhub down failed: {exc!r}\n{_tail(log)}"
    return None


class DlhubSystem:
    """The full dlhub path: ``dlhub up --detach``, then ``Executor(endpoint="local")``."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.home = tmp
        self.stack = contextlib.ExitStack()
        self.note = (
            f"dlhub up --home TMP --workers {workers} --detach, "
            "then dlhub.executor.Executor(endpoint='local')"
        )
        try:
            self._start(workers)
        except BaseException:
            self.close()
            raise

    def _start(self, workers: int) -> None:
        os.environ["DLHUB_HOME"] = str(self.home)
        cmd = dlhub_command() + [
            "up",
            "--home",
            str(self.home),
            "--workers",
            str(workers),
            "--detach",
        ]
        log = self.home / "bench-dlhub-up.log"
        start = time.perf_counter()
        try:
            with open(log, "w") as out:  # a file, not a pipe: a detached daemon may keep it open
                subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=120,
                    check=True,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"{' '.join(cmd)} failed: {exc!r}\n{_tail(log)}") from None
        self.startup = {"up_ready_s": round(time.perf_counter() - start, 3)}
        from dlhub.executor import Executor

        self.ex = self.stack.enter_context(Executor(endpoint="local"))

    def call(self, fn):
        return self.ex.submit(fn).result(timeout=RESULT_TIMEOUT_S)

    def run_many(self, fn, n: int) -> None:
        futures = [self.ex.submit(fn) for _ in range(n)]
        check_results(fn, [fut.result(timeout=RESULT_TIMEOUT_S) for fut in futures])

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            error = dlhub_down(self.home)
            if error:
                print(error, file=sys.stderr)


SYSTEMS = {"raw": RawSystem, "htex": HtexSystem, "dlhub": DlhubSystem}
