"""Client work that waits its turn at the manager: the rest of a Submit taken a slice at a time,
and the frames its client sent after it.

    Submit of 1,024 tasks --> the first SUBMIT_SLICE now, the rest here (put_rest)
    a later frame of that client --> here too, behind it (defer): nothing of a client overtakes
                                     its own earlier frames (a Cancel still finds its tasks)
    each turn: take() --> a piece per client in turn, until the loop's budget is spent

Why: a frame is not a unit of work (one Submit may carry a client's 1,024 tasks, tens of ms on a
busy manager), and while one client's slices waited the loop used to read no client frame at all,
so another user's single call waited for all of them. Now only that client's own frames wait;
other clients' frames are handled as they come. Bounded: past ``limit`` pieces the loop leaves
client frames in the socket (ZeroMQ's queue and high-water mark hold them, as before).
No sockets here: the broker reads and handles; this only keeps the order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from dlhub.protocol import messages as m

MAX_PIECES = 64  # pieces waiting, all clients together, before client frames are left unread


class ClientBacklog:
    def __init__(self, limit: int = MAX_PIECES):
        self.limit = limit
        self.size = 0
        # client identity -> (its session, a message, whether it is the rest of a sliced Submit)
        self._queues: OrderedDict[bytes, deque[tuple[Any, m.Message, bool]]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._queues)

    def full(self) -> bool:
        return self.size >= self.limit

    def waiting(self, identity: bytes) -> bool:
        """Whether ``identity`` has work waiting (its next frame must go behind it)."""
        return identity in self._queues

    def defer(self, identity: bytes, client: Any, msg: m.Message) -> None:
        """A frame of a client with work waiting: behind that work."""
        self._queues[identity].append((client, msg, False))
        self.size += 1

    def put_rest(self, identity: bytes, client: Any, rest: m.Submit) -> None:
        """The rest of a Submit whose first slice was just handled: first in its client's line."""
        queue = self._queues.get(identity)
        if queue is None:
            queue = self._queues[identity] = deque()
        queue.appendleft((client, rest, True))
        self.size += 1

    def take(self) -> Iterator[tuple[bytes, Any, m.Message, bool]]:
        """Pieces, one per client in turn, until none is left: (identity, session, message, is the
        rest of a Submit). The caller stops when its budget is spent and takes a new iterator next
        turn; what it did not take stays, in order."""
        while self._queues:
            for identity in list(self._queues):
                queue = self._queues.get(identity)
                if not queue:
                    continue
                client, msg, rest = queue.popleft()
                self.size -= 1
                if not queue:
                    del self._queues[identity]
                yield identity, client, msg, rest
