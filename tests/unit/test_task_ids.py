"""Task ids come from the OS's random source 256 at a time (``protocol/task_ids.py``): each is
``TASK_ID_BYTES`` long, none repeats across threads, and a forked child never hands out an id its
parent has buffered (it reads a fresh buffer)."""

from __future__ import annotations

import os
import threading

from dlhub.protocol import messages as m
from dlhub.protocol import task_ids
from dlhub.protocol.task_ids import IDS_PER_READ, new_task_id


def test_ids_have_the_wire_length_and_never_repeat_across_threads():
    seen: list[bytes] = []
    lock = threading.Lock()

    def take(n: int) -> None:
        mine = [new_task_id() for _ in range(n)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=take, args=(3 * IDS_PER_READ + 7,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 * (3 * IDS_PER_READ + 7)
    assert all(type(i) is bytes and len(i) == m.TASK_ID_BYTES for i in seen)
    assert len(set(seen)) == len(seen)


def test_a_forked_child_does_not_reuse_the_parents_buffered_ids():
    new_task_id()  # the buffer now holds IDS_PER_READ - 1 unused ids
    assert task_ids._next < len(task_ids._buffer)
    parent_next = [
        task_ids._buffer[o : o + m.TASK_ID_BYTES]
        for o in range(task_ids._next, len(task_ids._buffer), m.TASK_ID_BYTES)
    ]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, b"".join(new_task_id() for _ in range(8)))
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    child = [data[o : o + m.TASK_ID_BYTES] for o in range(0, len(data), m.TASK_ID_BYTES)]
    assert len(child) == 8
    assert not set(child) & set(parent_next)
    assert not set(child) & {new_task_id() for _ in range(8)}
