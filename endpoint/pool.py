"""The pool process: one per node of a block, started by a Parsl provider's launch command.

    Parsl provider (LocalProvider, Slurm, ...) --launch--> [pool]
        pool --spawns--> N worker processes (same process group: cancelling the block kills all)
        pool --DEALER--> endpoint: Hello (block, host, versions), Heartbeat, WorkerDied
        workers --DEALER--> endpoint directly (the data plane skips the pool: one hop fewer)

The pool supervises: it restarts a worker that dies and tells the endpoint which one died, so
the endpoint fails that worker's running task with ``WorkerLost`` instead of waiting. It exits
(ending its workers) when the endpoint says ``Shutdown`` or stops answering heartbeats.

Containerized pools (``pool.container`` in the endpoint config, ``container`` in the pool JSON):
the pool itself stays outside the image and starts each worker through the runtime
(``endpoint/containers.py``: ``apptainer exec``, ``ch-run``, ``podman run`` ...), so worker death,
restarts and block loss are supervised exactly as for bare workers. The worker reads its config
from stdin (``--config /dev/stdin``): no host path needs to exist in the image. Without a
container the pool spawns workers exactly as before (no extra work on that path).

Images per servable: ``StartWorker(worker_id, image)`` from the endpoint replaces an idle worker
with one in ``image`` (a path, or a URI taken from the endpoint's image cache; None: the pool's
own image) in the same slot, so the pool's worker count stays its budget; the slot keeps that
image across restarts. The new worker says its image in its Hello, and the endpoint routes that
servable's calls only to workers inside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time

import zmq

from dlhub.protocol import messages as m
from dlhub.protocol.curve import secure_link_client
from dlhub.protocol.serialize import runtime_versions

log = logging.getLogger("dlhub.pool")

SCHEDULER_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "COBALT_JOBID", "LSB_JOBID")
BLOCK_SIGNAL_GRACE_S = 0.5
IMAGE_START_GRACE_S = 10.0  # a worker in a servable image dying sooner, twice: the image fails
ACCELERATOR_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


class Pool:
    def __init__(self, config: dict, config_path: str, block_id: str):
        self.config, self.config_path, self.block_id = config, config_path, block_id
        self.pool_id = f"{block_id}.{socket.gethostname()}.{secrets.token_hex(3)}"
        self.n_workers = int(config["workers_per_node"])
        self.heartbeat_s = float(config.get("heartbeat_s", 2.0))
        self.threshold_s = float(config.get("heartbeat_threshold_s", 10.0))
        self.workers: dict[str, subprocess.Popen] = {}
        self.generation = 0
        self.stopping = False
        self.container = None  # a ContainerSpec when the workers run in an image
        self.slot_images: dict[int, str] = {}  # slots given a servable's image (StartWorker)
        self._image_specs: dict[str, object] = {}  # servable image -> its ContainerSpec
        self._image_pins: list = []
        self._quick_deaths: dict[int, int] = {}  # slot -> its image's workers dead at start in a row
        if (config.get("container") or {}).get("type", "none") != "none":
            self._prepare_container()

    def _prepare_container(self) -> None:
        """What every containerized worker of this pool shares: the spec, the dlhub binds and
        environment, and the config it reads from stdin (with the image's cache path)."""
        from . import containers

        raw = dict(self.config["container"])
        self.container = containers.ContainerSpec.from_dict(raw)
        self._container_problem: str | None = None
        try:
            if raw.get("image_cache"):
                self.container = self._image_from_cache(raw["image_cache"])
            data_cache = self.config.get("data_cache") or {}
            binds, env = containers.dlhub_binds(
                self.container, raw.get("bundle"), self.config.get("servable_cache"), data_cache.get("root")
            )
        except (containers.ContainerError, OSError) as exc:
            self._container_problem, binds, env = str(exc), [], {}
        self._container_binds, self._container_env = binds, env
        inside = {k: v for k, v in self.config.items() if k not in ("container", "image_cache")}
        inside["servable_cache"] = env.get("DLHUB_SERVABLE_CACHE")  # None: the image's tmp dir
        if env.get("DLHUB_DATA_CACHE"):  # staged files: the same cache, seen at its path inside
            inside["data_cache"] = {**(self.config.get("data_cache") or {}), "root": env["DLHUB_DATA_CACHE"]}
        self._container_inside = inside
        self._container_config = json.dumps(inside).encode()

    def _image_from_cache(self, cache: dict):
        """``container.image`` is a URI (``docker://``, ``oras://``, ``file://`` ...): the
        endpoint's image cache (``endpoint/images.py``, shared by every pool and block of the
        endpoint) fetches it once, and this pool pins the entry for its life (the pin goes stale
        with this process), so eviction never takes an image a running pool uses. Two blocks
        starting at once fetch it once: the other waits on the entry's lock."""
        import dataclasses

        from .images import ImageCache

        spec = self.container
        images = ImageCache(cache["root"], int(cache["budget_bytes"]), {spec.type: spec.executable})
        self._image_pin = images.pin(spec.image, spec.type)
        images.get(spec.image, spec.type)  # fetched once; a warm entry is only marked used (LRU)
        local = images.image_for(spec.image, spec.type)
        return dataclasses.replace(spec, image=local)

    def _spec_for(self, image: str):
        """The ContainerSpec of a servable's image: a path as is, a URI from the endpoint's image
        cache (normally fetched already when the servable was verified; pinned for our life)."""
        spec = self._image_specs.get(image)
        if spec is not None:
            return spec
        import dataclasses

        from .images import ImageCache, is_local

        local = image
        if not is_local(image):
            cache = self.config.get("image_cache") or {}
            if not cache:
                raise OSError(f"image {image!r}: this pool has no image cache")
            base = self.container
            images = ImageCache(cache["root"], int(cache["budget_bytes"]), {base.type: base.executable})
            self._image_pins.append(images.pin(image, base.type))
            images.get(image, base.type)
            local = images.image_for(image, base.type)
        spec = self._image_specs[image] = dataclasses.replace(self.container, image=local)
        return spec

    def start_in_image(self, sock: zmq.Socket, worker_id: str, image: str | None) -> None:
        """Replace worker ``worker_id`` (idle: the endpoint gives a worker it replaces no work)
        with one inside ``image`` in the same slot."""
        proc = self.workers.get(worker_id)
        if proc is None:  # gone already: the endpoint asks again if it still needs the image
            return
        if self.container is None:
            log.warning("StartWorker %s: this pool runs no container runtime; ignored", image)
            return
        slot = proc.slot  # type: ignore[attr-defined]
        self._quick_deaths.pop(slot, None)
        if image is None:
            self.slot_images.pop(slot, None)
        else:
            try:
                self._spec_for(image)
                self.slot_images[slot] = image
            except Exception as exc:  # the slot keeps its image; the endpoint asks again later
                log.error("cannot start a worker in image %s: %s", image, exc)
                return
        del self.workers[worker_id]
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._remove_container(proc)
        _send(sock, m.pack(m.WorkerDied(worker_id, proc.returncode or 0, f"replaced: image {image}")))
        self._spawn(slot)

    def check_container(self) -> str | None:
        """Why this pool's workers cannot start (the runtime missing, a bind's source missing),
        or None; checked once before the pool registers."""
        if self.container is None:
            return None
        if self._container_problem:
            return self._container_problem
        from . import containers

        try:
            containers.worker_launch(
                self.container, [self.container.python], {}, self._container_binds, worker_id="check"
            )
        except containers.ContainerError as exc:
            return str(exc)
        return None

    def _spawn(self, slot: int) -> None:
        self.generation += 1
        worker_id = f"{self.pool_id}.{slot}.{self.generation}"
        if self.container is not None:
            self._spawn_in_container(slot, worker_id)
            return
        env = dict(os.environ)
        env["DLHUB_WORKER_ID"] = worker_id
        accelerators = self.config.get("accelerators") or []
        if accelerators:  # each worker sees only its own device
            device = str(accelerators[slot % len(accelerators)])
            for var in ACCELERATOR_VARS:
                env[var] = device
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dlhub.endpoint.worker",
                "--config",
                self.config_path,
                "--worker-id",
                worker_id,
                "--pool-id",
                self.pool_id,
            ],
            env=env,
        )
        proc.slot = slot  # type: ignore[attr-defined]
        self.workers[worker_id] = proc

    def _spawn_in_container(self, slot: int, worker_id: str) -> None:
        from . import containers

        accelerators = self.config.get("accelerators") or []
        device = str(accelerators[slot % len(accelerators)]) if accelerators else None
        image = self.slot_images.get(slot)
        spec = self.container if image is None else self._spec_for(image)
        config = self._container_config
        if image is not None:  # the worker says its image in its Hello
            config = json.dumps({**self._container_inside, "image": image}).encode()
        cmd = [spec.python, "-m", "dlhub.endpoint.worker", "--config", "/dev/stdin"]
        cmd += ["--worker-id", worker_id, "--pool-id", self.pool_id]
        env = containers.worker_env(worker_id, device, self._container_env)
        launch = containers.worker_launch(
            spec, cmd, env, self._container_binds, [device] if device else [], worker_id
        )
        proc = subprocess.Popen(launch.argv, env=launch.env, stdin=subprocess.PIPE)
        try:
            proc.stdin.write(config)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:  # the runtime failed at once: reaped (and restarted) like any death
            pass
        proc.slot = slot  # type: ignore[attr-defined]
        proc.started = time.monotonic()  # type: ignore[attr-defined]
        proc.container_name = launch.name  # type: ignore[attr-defined]
        self.workers[worker_id] = proc

    def _remove_container(self, proc: subprocess.Popen, wait: bool = False) -> None:
        """podman/docker: killing the ``run`` client leaves the container; remove it."""
        name = getattr(proc, "container_name", None)
        if name is None:
            return
        from . import containers

        if wait:
            containers.remove_container(self.container, name)
        else:
            import threading

            threading.Thread(
                target=containers.remove_container, args=(self.container, name), daemon=True
            ).start()

    def run(self) -> int:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"p:{self.pool_id}".encode())
        sock.setsockopt(zmq.LINGER, 1000)
        secure_link_client(sock, self.config)  # CurveZMQ with the endpoint session's keys
        problem = self.check_container()
        if problem:  # before Hello: the block ends and the endpoint shows this in block_errors
            log.error("pool cannot start its workers: %s", problem)
            print(f"dlhub pool: {problem}", file=sys.stderr, flush=True)
            sock.close(linger=0)
            ctx.term()
            return 2
        sock.connect(self.config["endpoint_url"])
        info = {
            "block_id": self.block_id,
            "pool_name": self.config.get("pool_name", "default"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "workers": self.n_workers,
            "job_id": next((os.environ[v] for v in SCHEDULER_JOB_VARS if v in os.environ), None),
            "platform": platform.platform(),
            "accelerators": self.config.get("accelerators") or [],
            # the block's walltime counts from (about) now: the pool is its first process
            "walltime_left_s": self.config.get("walltime_s"),
        }
        if self.container is not None:
            info["container"] = {"type": self.container.type, "image": self.container.image}
        _send(
            sock,
            m.pack(
                m.Hello(
                    "pool",
                    self.pool_id,
                    self.config["token"],
                    self.pool_id,
                    {**runtime_versions(), "protocol": m.PROTOCOL_VERSION},
                    info,
                )
            ),
        )
        for slot in range(self.n_workers):
            self._spawn(slot)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        last_heard = time.monotonic()
        next_beat = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_beat:
                    _send(sock, m.pack(m.Heartbeat({"workers": len(self.workers)})))
                    next_beat = now + self.heartbeat_s
                if sock.poll(min(250, int(self.heartbeat_s * 1000))):
                    while True:
                        try:
                            msg = m.unpack(sock.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                        except Exception as exc:
                            log.warning("bad frame from endpoint: %s", exc)
                            continue
                        last_heard = time.monotonic()
                        if isinstance(msg, m.KillWorker):
                            proc = self.workers.get(msg.worker_id)
                            if proc is not None:
                                log.warning("killing worker %s: %s", msg.worker_id, msg.reason)
                                proc.kill()
                                self._remove_container(proc)
                        elif isinstance(msg, m.StartWorker):
                            log.info("worker %s -> image %s", msg.worker_id, msg.image)
                            self.start_in_image(sock, msg.worker_id, msg.image)
                        elif isinstance(msg, (m.Shutdown, m.Refused)):
                            log.info("pool %s stopping: %s", self.pool_id, msg)
                            return 0
                if time.monotonic() - last_heard > self.threshold_s:
                    log.warning("endpoint silent for %.0f s; pool exits", self.threshold_s)
                    return 1
                self._reap(sock)
        finally:
            self.stopping = True
            self._stop_workers()
            if self._image_pins:
                from .images import ImageCache

                for pin in self._image_pins:
                    ImageCache.unpin(pin)
            sock.close()
            ctx.term()
        return 0

    def _reap(self, sock: zmq.Socket) -> None:
        for worker_id, proc in list(self.workers.items()):
            code = proc.poll()
            if code is None:
                continue
            if code < 0 and not self.stopping:
                # A scheduler ending the job (scancel, walltime) signals every process in it; the
                # worker may die first. Give our own signal a moment to arrive: if it does, this
                # is the block ending (its tasks are retried), not a worker dying (WorkerLost).
                deadline = time.monotonic() + BLOCK_SIGNAL_GRACE_S
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.02)
            if self.stopping:
                return
            del self.workers[worker_id]
            self._remove_container(proc)
            reason = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            _send(sock, m.pack(m.WorkerDied(worker_id, code, reason)))
            slot = proc.slot  # type: ignore[attr-defined]
            image = self.slot_images.get(slot)
            if image is not None:
                lived = time.monotonic() - getattr(proc, "started", 0.0)
                quick = self._quick_deaths[slot] = (
                    self._quick_deaths.get(slot, 0) + 1 if lived < IMAGE_START_GRACE_S else 0
                )
                if quick >= 2:  # it cannot start there: back to the pool's own image
                    del self.slot_images[slot]
                    self._quick_deaths.pop(slot, None)
                    why = (
                        f"workers inside it exit as they start ({reason}, twice within "
                        f"{IMAGE_START_GRACE_S:.0f} s)"
                    )
                    log.error("image %s: %s", image, why)
                    _send(sock, m.pack(m.ImageFailed(image, why)))
            self._spawn(slot)

    def _stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for proc in self.workers.values():
            self._remove_container(proc, wait=True)


def _send(sock: zmq.Socket, frame: bytes) -> None:
    """Send without ever blocking. A DEALER whose endpoint refused it at the handshake (e.g. a
    restarted endpoint with new session keys) has no pipe left, and a plain send would then block
    forever: the pool would never notice the silence and would hold its node until walltime.
    Dropped frames are fine: the endpoint being silent ends the pool after its threshold."""
    try:
        sock.send(frame, zmq.NOBLOCK)
    except zmq.Again:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="dlhub worker pool (started by an endpoint)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--block-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(args.config) as f:
        config = json.load(f)
    sys.exit(Pool(config, args.config, args.block_id).run())


if __name__ == "__main__":
    main()
