"""Pools as Parsl block executors: Parsl's providers and launchers start, watch, scale, cancel.

``PoolExecutor`` subclasses Parsl's ``BlockProviderExecutor`` and is driven by Parsl's
``JobStatusPoller`` (its scaling strategy runs on the poller's thread). The block's command
starts our pool process (``python -m dlhub.endpoint.pool``), which reads a JSON file written by
the endpoint instead of a long command line. Traps handled (see DESIGN.md): ``scale_in`` only
cancels idle blocks; ``block_error_handler=False``; the pool never calls ``setsid``, so the
provider's process-group kill ends its workers too. Parsl is pinned: ``*_facade`` is internal.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parsl.executors.status_handling import BlockProviderExecutor
from parsl.jobs.job_status_poller import JobStatusPoller
from parsl.jobs.states import TERMINAL_STATES, JobState, JobStatus
from parsl.launchers import (
    AprunLauncher,
    MpiExecLauncher,
    SimpleLauncher,
    SingleNodeLauncher,
    SrunLauncher,
)
from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider, TorqueProvider

from .config import EndpointConfig, ProviderConfig, walltime_seconds

log = logging.getLogger("dlhub.endpoint.engine")


def build_launcher(launcher: Any) -> Any:
    """Our launcher config -> Parsl's launcher (it wraps the pool command once per node)."""
    if launcher.type == "single-node":
        return SingleNodeLauncher()
    if launcher.type == "simple":
        return SimpleLauncher()
    if launcher.type == "srun":
        return SrunLauncher(overrides=launcher.overrides)
    if launcher.type == "mpiexec":
        return MpiExecLauncher(bind_cmd=launcher.bind_cmd, overrides=launcher.overrides)
    if launcher.type == "aprun":
        return AprunLauncher(overrides=launcher.overrides)
    raise ValueError(f"launcher type {launcher.type!r} is not supported")  # pragma: no cover


def provider_class(provider: ProviderConfig) -> type:
    return {
        "local": LocalProvider,
        "slurm": SlurmProvider,
        "pbspro": PBSProProvider,
        "torque": TorqueProvider,
    }[provider.type]


def provider_kwargs(p: ProviderConfig) -> dict[str, Any]:
    """Keyword arguments for the Parsl provider; every key of ours maps onto one of Parsl's."""
    kwargs: dict[str, Any] = {
        "launcher": build_launcher(p.launcher),
        "init_blocks": p.init_blocks,
        "min_blocks": p.min_blocks,
        "max_blocks": p.max_blocks,
        "parallelism": p.parallelism,
        # strict: a failing line ends the block at once (its output names the error) instead of
        # starting the pool in the wrong environment and failing tasks later
        "worker_init": f"set -e\n{p.worker_init}\nset +e" if p.worker_init.strip() else "",
        "cmd_timeout": p.cmd_timeout_s,
    }
    if p.type == "local":
        return kwargs
    kwargs.update(
        nodes_per_block=p.nodes_per_block,
        walltime=hours_minutes_seconds(p.walltime),  # Parsl and PBS read HH:MM:SS, not D-HH:MM:SS
        account=p.account,
        scheduler_options=p.scheduler_options,
    )
    if p.type == "slurm":
        kwargs.update(
            partition=p.partition,
            qos=p.qos,
            constraint=p.constraint,
            clusters=p.clusters,
            cores_per_node=p.cores_per_node,
            mem_per_node=p.mem_per_node_gb,
            gpus_per_node=p.gpus_per_node,
            gres=p.gres,
            exclusive=p.exclusive,
        )
    elif p.type == "pbspro":
        kwargs.update(queue=p.queue, select_options=p.select_options, cpus_per_node=p.cpus_per_node)
    elif p.type == "torque":
        kwargs.update(queue=p.queue)
    return kwargs


def hours_minutes_seconds(walltime: str) -> str:
    """``1-02:03:04`` -> ``26:03:04``: the form Parsl's providers and PBS understand."""
    seconds = walltime_seconds(walltime)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def build_provider(provider: ProviderConfig) -> Any:
    return provider_class(provider)(**provider_kwargs(provider))


def render_submit_script(provider: ProviderConfig, command: str, script_dir: Path) -> tuple[str, list[str]]:
    """Render the block's submit script and the scheduler commands Parsl would run, without
    running them: the provider's one shell seam (``execute_wait``) records instead."""
    base = provider_class(provider)
    commands: list[str] = []
    if provider.type == "local":  # no scheduler: the "script" is what bash runs
        launcher = build_launcher(provider.launcher)
        worker_init = provider_kwargs(provider)["worker_init"]  # as LocalProvider will run it
        return f"{worker_init}\n{launcher(command, 1, 1)}\n", commands

    class DryRun(base):  # type: ignore[misc, valid-type]
        def execute_wait(self, cmd, timeout=None):
            commands.append(cmd)
            if cmd.startswith(("sbatch", "qsub")):
                return 0, "Submitted batch job 4242\n" if cmd.startswith("sbatch") else "4242.server\n", ""
            return 1, "", "dry run"

    dry = DryRun(**provider_kwargs(provider))
    dry.script_dir = str(script_dir)
    script_dir.mkdir(parents=True, exist_ok=True)
    dry.submit(command, 1, "dlhub.check")
    submit = next(c for c in commands if c.startswith(("sbatch", "qsub")))
    return Path(submit.split()[-1]).read_text(), commands


class PoolExecutor(BlockProviderExecutor):
    """Blocks of dlhub pools. Tasks never go through ``submit``: the endpoint loop routes them."""

    def __init__(
        self,
        provider: Any,
        pool_config_path: Path,
        workers_per_node: int,
        outstanding: Callable[[], int],
        idle_blocks: Callable[[], list[str]],
        python: str = "",
        label: str = "dlhub-pool",
        pool_name: str = "default",
    ):
        super().__init__(provider=provider, block_error_handler=False)
        self.label = label
        self._pool_config_path = pool_config_path
        self._workers_per_node = workers_per_node
        self._outstanding = outstanding
        self._idle_blocks = idle_blocks
        self._python = python or sys.executable
        self.pool_name = pool_name

    def _get_launch_command(self, block_id: str) -> str:
        return " ".join(
            shlex.quote(part)
            for part in (
                self._python,
                "-m",
                "dlhub.endpoint.pool",
                "--config",
                str(self._pool_config_path),
                "--block-id",
                f"{self.pool_name}/{block_id}",  # unique across the endpoint's pools
            )
        )

    def outstanding(self) -> int:
        return self._outstanding()

    @property
    def workers_per_node(self) -> int:
        return self._workers_per_node

    def scale_in(self, blocks: int) -> list[str]:
        """Cancel up to ``blocks`` blocks, idle ones only: a busy block is never cancelled."""
        idle = set(self._idle_blocks())
        candidates = [
            block_id
            for block_id, status in list(self._status.items())
            if status.state not in TERMINAL_STATES and block_id in idle
        ][:blocks]
        if not candidates or self.provider is None:
            return []
        job_ids = [self.blocks_to_job_id[b] for b in candidates]
        log.info("scaling in idle blocks %s (jobs %s)", candidates, job_ids)
        killed = self.provider.cancel(job_ids)
        return [self.job_ids_to_block[j] for j in self._filter_scale_in_ids(job_ids, killed)]

    def fresh_status(self, block_ids: list[str]) -> list[Any]:
        """Ask the provider now, bypassing its cache, and leave its cache as it was.

        Parsl's providers never re-query a job once they have seen it terminal, and the Slurm
        provider reports a job missing from ``sacct`` as COMPLETED; ``sacct`` learns of a job a
        moment after ``sbatch``. Asking early would cache a false end for good, so each job's
        cached status is reset before the query and restored after it; :meth:`mark_ended` makes
        an end stick once the endpoint has confirmed it.
        """
        assert self.provider is not None
        resources = getattr(self.provider, "resources", {})
        job_ids = [self.blocks_to_job_id[b] for b in block_ids]
        saved = {j: resources[j]["status"] for j in job_ids if j in resources}
        for j in saved:
            resources[j]["status"] = JobStatus(JobState.PENDING)
        try:
            return list(self.provider.status(job_ids))
        finally:
            for j, status in saved.items():
                resources[j]["status"] = status

    def mark_ended(self, block_id: str, status: Any) -> None:
        """Record a block's confirmed end before Parsl's own poll (5-60 s apart), in the
        provider's cache and the executor's view, so the strategy counts it gone and starts a
        replacement at its next tick."""
        job_id = self.blocks_to_job_id.get(block_id)
        resources = getattr(self.provider, "resources", {})
        if job_id in resources:
            resources[job_id]["status"] = status
        self._status[block_id] = status

    def cancel_all(self) -> None:
        live = [
            self.blocks_to_job_id[b]
            for b, s in list(self._status.items())
            if s.state not in TERMINAL_STATES and b in self.blocks_to_job_id
        ]
        if live and self.provider is not None:
            self.provider.cancel(live)

    def block_states(self) -> dict[str, dict[str, Any]]:
        return {
            b: {
                "job_id": self.blocks_to_job_id.get(b),
                "state": s.state.name,
                "message": s.message,
            }
            for b, s in list(self._status.items())
        }

    def keep_min_blocks(self) -> list[str]:
        """Start blocks to make up ``min_blocks`` after blocks ended (killed, walltime, node
        loss). Parsl's strategy does not: with no task outstanding it takes no action below
        ``min_blocks`` (its case 1a), so an endpoint whose only block ended while idle kept no
        pool, and the manager sends no work to an endpoint with no workers. Runs on the poller's
        thread, after the strategy, so it never races it. A pool refused for failing blocks
        (bad state) is left alone."""
        if self.provider is None or self.bad_state_is_set:
            return []
        active = sum(1 for s in list(self._status.values()) if s.state not in TERMINAL_STATES)
        missing = self.provider.min_blocks - active
        if missing <= 0:
            return []
        log.info(
            "pool %s has %d live block(s), min_blocks is %d: starting %d",
            self.pool_name,
            active,
            self.provider.min_blocks,
            missing,
        )
        return self.scale_out_facade(missing)

    def submit(self, func, resource_specification, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError("dlhub pools receive tasks from the endpoint, not from Parsl")

    def shutdown(self) -> None:
        self.cancel_all()


class PoolPoller(JobStatusPoller):
    """Parsl's poller and ``simple`` strategy, then :meth:`PoolExecutor.keep_min_blocks`."""

    def poll(self) -> None:
        super().poll()
        for executor in self._executors:
            if isinstance(executor, PoolExecutor):
                executor.keep_min_blocks()


def start_scaling(executors: list[PoolExecutor], run_dir: Path, config: EndpointConfig) -> JobStatusPoller:
    """Start Parsl's poller + strategy over every pool; run its first pass now so init blocks
    start at once (the poller's own first tick comes a strategy period later)."""
    for executor in executors:
        script_dir = run_dir / "submit_scripts" / executor.pool_name
        script_dir.mkdir(parents=True, exist_ok=True)
        executor.provider.script_dir = str(script_dir)
        executor.run_dir = str(run_dir)
        executor.start()
    poller = PoolPoller(
        strategy="simple",
        max_idletime=config.max_idletime_s,
        strategy_period=config.strategy_period_s,
    )
    poller.add_executors(executors)
    poller.poll()
    return poller
