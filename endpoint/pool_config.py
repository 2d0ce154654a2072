"""``pool-NAME.json``: what a named pool's processes and workers need to start, per endpoint session.

The endpoint writes one file (0600) per named pool at start-up, once its worker socket is bound
and its link keys are made; Parsl's blocks start ``dlhub.endpoint.pool --config`` on it
(:mod:`.engine`), and the pool hands it on to each worker (:mod:`.pool`, :mod:`.worker`). Split
from the daemon (``endpoint/daemon.py``): the file's contents are a role of their own (the pool
side's settings, secrets and caches), and writing them touches no state of the endpoint loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import EndpointConfig, walltime_seconds


def link_secrets(config: EndpointConfig, link_keys: dict[str, Any]) -> dict[str, Any]:
    """What pool.json gives pools and workers to get in: the CURVE client keys, or the PLAIN
    password (``worker_link: plain``)."""
    if config.worker_link == "plain":
        return {"plain": {"password": link_keys["client_secret"]}}
    return {"curve": {k: v for k, v in link_keys.items() if k != "server_secret"}}


def write_pool_configs(
    config: EndpointConfig, run_dir: Path, worker_url: str, pool_token: str, link_keys: dict[str, Any]
) -> dict[str, Path]:
    """One JSON file per named pool: what its pool processes and workers need to start; returns
    each pool's file."""
    paths: dict[str, Path] = {}
    bundle = None
    for name, named in config.all_pools().items():
        path = paths[name] = run_dir / f"pool-{name}.json"
        cfg = {
            "pool_name": name,
            "endpoint_url": worker_url,
            "token": pool_token,
            **link_secrets(config, link_keys),
            "workers_per_node": named.pool.workers_per_node,
            "heartbeat_s": config.heartbeat_s,
            "heartbeat_threshold_s": config.heartbeat_threshold_s,
            "payload_limit_bytes": config.payload_limit_bytes,
            "output_limit_bytes": config.output_limit_bytes,
            "worker_cache": config.worker_cache.model_dump(),
            "servable_cache": str(run_dir / "servables" / "unpacked"),  # not a shared /tmp
            "data_cache": {  # inputs by reference (endpoint/staging.py)
                "root": str(run_dir / "data"),
                "budget_bytes": int(config.data_cache.budget_gb * 1e9),
                "outputs": config.data_cache.outputs,
            },
            "accelerators": list(named.pool.accelerators),
            "walltime_s": None
            if named.provider.type == "local"
            else walltime_seconds(named.provider.walltime),
        }
        container = named.pool.container
        if container.type != "none":  # workers run in an image (endpoint/containers.py)
            cfg["container"] = container.model_dump(mode="json")
            if container.dlhub == "bind":  # a copy of this dlhub, bound into the image
                if bundle is None:
                    from .containers import prepare_bundle

                    bundle = str(prepare_bundle(run_dir / "container"))
                cfg["container"]["bundle"] = bundle
            from .images import is_local

            cfg["image_cache"] = {  # servables' own images (StartWorker) come from it too
                "root": str(run_dir / "images"),
                "budget_bytes": int(config.image_cache.budget_gb * 1e9),
            }
            if not is_local(container.image):  # a URI: fetched once into the image cache
                cfg["container"]["image_cache"] = {
                    "root": str(run_dir / "images"),
                    "budget_bytes": int(config.image_cache.budget_gb * 1e9),
                }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
    return paths
