"""Task ids for a burst of submits: 16 random bytes each, read from the OS 256 ids at a time.

One ``os.urandom`` call per submit was one ``getrandom`` system call, and each released the GIL:
the client's I/O thread took it there and sent the few tasks queued so far, so a burst of
``Executor.submit`` calls went out a handful per message, the submitting thread waiting for the
GIL between each (half the wall time of a 20,000-call burst; issue 15 item 2). Read 4 KiB at a
time, the submitting thread keeps the GIL until the interpreter's switch interval and the I/O
thread sends hundreds of tasks a message. Ids stay as unpredictable as before (the same source);
a forked child starts a fresh buffer, so parent and child never hand out the same id.
"""

from __future__ import annotations

import os
import threading

from .messages import TASK_ID_BYTES

IDS_PER_READ = 256

_lock = threading.Lock()
_buffer = b""
_next = 0  # offset of the next unused id in _buffer


def new_task_id() -> bytes:
    """A fresh random task id (``TASK_ID_BYTES`` bytes); thread-safe."""
    global _buffer, _next
    with _lock:
        if _next >= len(_buffer):
            _buffer, _next = os.urandom(TASK_ID_BYTES * IDS_PER_READ), 0
        start = _next
        _next += TASK_ID_BYTES
        return _buffer[start:_next]


def _forget_in_child() -> None:
    global _buffer, _next, _lock
    _lock = threading.Lock()  # a fork while another thread held it must not leave it held
    _buffer, _next = b"", 0


os.register_at_fork(after_in_child=_forget_in_child)
