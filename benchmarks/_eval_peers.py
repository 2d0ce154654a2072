"""evaluation.py's peer serving systems: their venvs (created on demand, never .venv) and a
peer server started from one of them, driven over HTTP (``PeerSystem.call``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / "_peers"
EXAMPLES_PY = HERE.parent / "executor" / "examples.py"
TIMEOUT = 120
NAMES = [  # the six published examples, as every system serves them
    "noop",
    "composition-featurizer",
    "composition-rf",
    "diabetes-rf",
    "digits-cnn",
    "composition-pipeline",
]
PEERS_VENV = HERE / ".venv-peers"
PEERS_PY = PEERS_VENV / "bin" / "python"
# PyTriton (0.5.7 through 0.7.0) needs NumPy 1.x: under NumPy 2 its Python-backend stub reads every
# input tensor as garbage (a BYTES element's length prefix read from the wrong bytes: "unpack_from
# requires a buffer of 842150454 bytes"; an FP32 identity model answers "output tensor shape does
# not match"), and 0.7.0 pins numpy<2. NumPy 1.26 reads the models NumPy 2 pickled (numpy._core).
PYTRITON_VENV = HERE / ".venv-pytriton"
PYTRITON_PY = PYTRITON_VENV / "bin" / "python"
VENVS = {  # peer venvs: (folder, its python, requirements file)
    "peers": (PEERS_VENV, PEERS_PY, HERE / "peers-requirements.txt"),
    "pytriton": (PYTRITON_VENV, PYTRITON_PY, HERE / "peers-pytriton-requirements.txt"),
}


def venv_of(system: str) -> str:
    return "pytriton" if system == "pytriton" else "peers"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerSystem:
    """A peer server: ``_peers/<system>_app.py PORT WORKERS BATCH MODEL_DIR`` in the peers venv."""

    def __init__(self, system: str, tmp: Path, workers: int, batch: int, model_dir: Path):
        import httpx

        self.system, self.port = system, free_port()
        self.log = tmp / f"{system}-{workers}-{batch}.log"
        env = {
            **os.environ,
            "EVAL_EXAMPLES_PY": str(EXAMPLES_PY),
            "EVAL_MODEL_DIR": str(model_dir),
            "PYTHONPATH": str(PEERS_DIR),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        env.pop("VIRTUAL_ENV", None)
        if system == "pytriton":
            # Triton's Python-backend stub links libpython3.11.so.1.0: without this it finds the
            # system's (Debian 3.11.2) and runs it on the venv's 3.11.7 stdlib, and every model's
            # initialize fails in multiprocessing (RLock has no _recursion_count)
            libdir = Path(os.path.realpath(PYTRITON_PY)).parent.parent / "lib"
            env["LD_LIBRARY_PATH"] = f"{libdir}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    str(VENVS[venv_of(system)][1]),
                    str(PEERS_DIR / f"{system}_app.py"),
                    str(self.port),
                    str(workers),
                    str(batch),
                    str(model_dir),
                ],
                cwd=PEERS_DIR,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.local = threading.local()
        self.httpx = httpx

    def client(self):
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = self.httpx.Client(timeout=TIMEOUT)
        return c

    def call(self, name: str, x):
        base = f"http://127.0.0.1:{self.port}"
        c = self.client()
        if self.system == "fastapi":
            r = c.post(f"{base}/predict/{name}", json={"x": x})
        elif self.system in ("litserve", "ray"):
            r = c.post(f"{base}/predict", json={"name": name, "x": x})
        else:  # mlserver, pytriton: KServe V2, one BYTES element holding the JSON input
            body = {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 1] if self.system == "pytriton" else [1],
                        "datatype": "BYTES",
                        "data": [json.dumps(x)],
                    }
                ]
            }
            r = c.post(f"{base}/v2/models/{name}/infer", json=body)
            r.raise_for_status()
            data = r.json()["outputs"][0]["data"]
            return json.loads(data[0])
        r.raise_for_status()
        return r.json()["y"]

    def wait_ready(self, probe_name: str, probe_x, deadline_s: float = 240) -> None:
        end = time.monotonic() + deadline_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.system} exited {self.proc.returncode}:\n{self.log.read_text()[-2500:]}"
                )
            try:
                self.call(probe_name, probe_x)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > end:
                    raise RuntimeError(
                        f"{self.system} not ready in {deadline_s}s:\n{self.log.read_text()[-2500:]}"
                    )
                time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        if self.system == "ray":  # ray's own daemons leave the process group
            subprocess.run(
                [str(PEERS_VENV / "bin" / "ray"), "stop", "--force"], capture_output=True, timeout=60
            )


def ensure_peers_venv(emit, name: str = "peers") -> str | None:
    """Create the peer venv ``name`` (see :data:`VENVS`) unless it exists; why not, if it failed."""
    venv, python, requirements = VENVS[name]
    if python.exists():
        return None
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
            check=True,
            timeout=1800,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        return f"creating {venv} failed: {exc!r}"
    emit("peers_venv", name, install_s=round(time.perf_counter() - t0, 1))
    return None
