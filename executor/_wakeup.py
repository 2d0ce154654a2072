"""Wake the Executor's I/O thread from user threads, on any OS.

    user thread: Connection.send(item) -> outgoing.append(item); wakeup.wake()
    I/O thread:  zmq.Poller.poll([manager socket, wakeup.fileno()]) -> wakeup.drain() -> send outgoing
                 (drain empties the descriptor, then lowers the flag: see Wakeup.drain)

Two implementations of one small interface (``fileno``, ``wake``, ``drain``, ``close``):

- ``socketpair``: a connected pair of local sockets; portable (Linux, macOS, Windows).
- ``eventfd``: one Linux eventfd; a ``wake()`` costs about half a socket send (measured here:
  ~6 us against ~15 us a call; the poll wakes equally fast), so it is chosen where it exists.

``$DLHUB_WAKEUP`` (``eventfd`` or ``socketpair``) forces one (the tests run both). Wakes coalesce:
while one is pending, further ``wake()`` calls cost a flag test. ``wake()`` after ``close()``
does nothing: it never writes to a closed, possibly reused, file descriptor.
"""

from __future__ import annotations

import os
import socket
import threading

KINDS = ("eventfd", "socketpair")


class Wakeup:
    """The shared part: coalescing and a close that later wakes cannot race."""

    kind = ""

    def __init__(self) -> None:
        self._armed = False  # a wake is pending and not yet drained
        self._closed = False
        self._lock = threading.Lock()  # close() against wake(): no write to a closed descriptor

    def fileno(self) -> int:
        raise NotImplementedError

    def wake(self) -> None:
        """Make the next (or current) poll return. Cheap when a wake is already pending."""
        if self._armed:
            return
        with self._lock:
            if self._closed:
                return
            self._armed = True
            self._write()

    def drain(self) -> None:
        """Called by the polling thread before it looks at its queue: empty, then disarm.

        The order matters. Disarming first let a ``wake()`` slip in between the two steps: it
        saw the flag down, raised it and wrote, and the read then swallowed that write, leaving
        the flag up over an empty descriptor, so every later ``wake()`` returned early and each
        send waited for the poll's timeout (2 s in the Executor). Emptied first, a ``wake()``
        that still sees the flag up needs no write: its item was queued before it looked, so the
        queue check that follows every drain finds it."""
        with self._lock:
            if not self._closed:
                self._read()
            self._armed = False  # after reading: a wake() from now on writes again

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    def _write(self) -> None:
        raise NotImplementedError

    def _read(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class EventfdWakeup(Wakeup):
    """Linux only (``os.eventfd``, Python 3.10+)."""

    kind = "eventfd"

    def __init__(self) -> None:
        super().__init__()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def _write(self) -> None:
        os.eventfd_write(self._fd, 1)

    def _read(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass

    def _close(self) -> None:
        os.close(self._fd)


class SocketPairWakeup(Wakeup):
    """Portable: a byte on one end of a local socket pair makes the other end readable."""

    kind = "socketpair"

    def __init__(self) -> None:
        super().__init__()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def _write(self) -> None:
        try:
            self._writer.send(b"\0")
        except BlockingIOError:  # the buffer is full of earlier wakes: the reader will wake anyway
            pass

    def _read(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _close(self) -> None:
        self._reader.close()
        self._writer.close()


def make_wakeup(kind: str | None = None) -> Wakeup:
    """``kind`` (else ``$DLHUB_WAKEUP``, else eventfd where the OS has it, else a socket pair)."""
    kind = kind or os.environ.get("DLHUB_WAKEUP") or ""
    if kind and kind not in KINDS:
        raise ValueError(f"DLHUB_WAKEUP must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "eventfd" and not hasattr(os, "eventfd"):
        raise ValueError("DLHUB_WAKEUP=eventfd: this OS has no eventfd (use socketpair)")
    if kind == "eventfd" or (not kind and hasattr(os, "eventfd")):
        return EventfdWakeup()
    return SocketPairWakeup()


__all__ = ["KINDS", "EventfdWakeup", "SocketPairWakeup", "Wakeup", "make_wakeup"]
