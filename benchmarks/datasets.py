"""Data set upload and download throughput vs a plain file copy, in one run (issue 16, item 1).

    .venv/bin/python benchmarks/datasets.py            # a 512 MiB file
    .venv/bin/python benchmarks/datasets.py --quick    # 64 MiB, results checked

A manager (in this process: REST on 127.0.0.1; its peak RSS is this process's) and a client in a
child process (spawned, so its peak RSS is its own): ``Client.publish_dataset`` (client-side
sha256, 8 MiB chunks over HTTP, manager-side sha256 as they arrive, rename into the blob store)
and ``Client.download`` (streamed, hashed, renamed). Baselines in the same run:
``shutil.copyfile`` of the same file and one sha256 pass over it. Exits 1 if the download differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def client_side(url: str, token: str, src: str, out: str, queue) -> None:
    from dlhub.executor import Client, Dataset

    client = Client(url, token, timeout_s=300)
    t0 = time.perf_counter()
    ref = client.publish_dataset(Dataset("bench-data", title="Benchmark", authors=["Doe, Jane"], files=[src]))
    t1 = time.perf_counter()
    client.download(ref, to=out)
    t2 = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"upload_s": t1 - t0, "download_s": t2 - t1, "client_peak_rss_mib": round(peak_mib, 1)})


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=None)
    args = parser.parse_args()
    mib = args.mib or (64 if args.quick else 512)

    from dlhub.manager import Manager, ManagerConfig

    with tempfile.TemporaryDirectory(prefix="dlhub-bench-data-") as tmp:
        root = Path(tmp)
        src = root / "input.bin"
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        t = time.perf_counter()
        shutil.copyfile(src, root / "copy.bin")
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        file_sha(src)
        hash_s = time.perf_counter() - t
        (root / "copy.bin").unlink()

        manager = Manager(ManagerConfig(home=root / "manager"))
        manager.start_thread()
        try:
            token = (root / "manager" / "admin.token").read_text().strip()
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            child = ctx.Process(
                target=client_side, args=(manager.api.url, token, str(src), str(root / "out"), queue)
            )
            child.start()
            result = queue.get(timeout=600)
            child.join(60)
        finally:
            manager.stop()
        manager_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        same = file_sha(root / "out" / "input.bin") == file_sha(src)
    figures = {
        "file_mib": mib,
        "copy_mib_s": round(mib / copy_s, 1),
        "sha256_mib_s": round(mib / hash_s, 1),
        "upload_mib_s": round(mib / result["upload_s"], 1),
        "download_mib_s": round(mib / result["download_s"], 1),
        "client_peak_rss_mib": result["client_peak_rss_mib"],
        "manager_process_peak_rss_mib": round(manager_peak_mib, 1),
        "downloaded_file_identical": same,
    }
    print(json.dumps(figures, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
