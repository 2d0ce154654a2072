"""A large echo through a real stack (``dlhub up``): the manager keeps the 1 MiB result as a file
in ``<home>/manager/task-blobs`` and frees the payload's file once the task is done (issue 15,
item 1; the store itself: tests/unit/test_store_blobs.py)."""

from __future__ import annotations

import os
import time

MIB = 1024 * 1024


def echo(x):
    return x


def files(folder) -> set:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_a_large_echo_through_a_real_stack_leaves_a_result_file_and_frees_its_payload(stack, ex):
    root = stack.home / "manager" / "task-blobs"
    payloads_before = files(root / "payload")  # the session stack's other tests may have left some
    data = os.urandom(MIB)
    assert ex.submit(echo, data).result(timeout=60) == data
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(p.stat().st_size >= MIB for p in files(root / "result")):
        time.sleep(0.05)
    assert any(p.stat().st_size >= MIB for p in files(root / "result"))
    while time.monotonic() < deadline and files(root / "payload") - payloads_before:
        time.sleep(0.05)
    assert not files(root / "payload") - payloads_before  # freed once the result was committed
