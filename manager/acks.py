"""Acknowledgements after commit: ``Accepted`` goes out only for what the task store committed.

    writer thread --committed(acks)--> [queue] --wake--> loop: send(finished)
        client acks: one Accepted per client (and per kind) at once
        endpoint acks: wait up to ENDPOINT_ACK_DELAY_S, or ENDPOINT_ACK_BATCH of them, then one
                       Accepted per endpoint (send_endpoint_acks)

Apart from the broker loop because the batching keeps state and timing of its own (what waits
for which endpoint session, and until when); the loop only wakes it and sends what it says, through
the ``send`` it was given (no sockets here).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from dlhub.protocol import messages as m

# An endpoint's results are acknowledged (Accepted, after the commit) at most this late, or at
# once when this many wait: one message, and one endpoint wake-up, per many results rather than
# per result (a serial caller's results came one commit, one Accepted each). The endpoint keeps
# a result until its ack, so an ack sent later only keeps a copy there a little longer.
ENDPOINT_ACK_DELAY_S = 0.05
ENDPOINT_ACK_BATCH = 1000


class CommitAcks:
    """The committed ids on their way to ``Accepted``. ``committed`` is called on the task store's
    writer thread; everything else on the loop.

    ``wake()`` wakes the loop, which then calls :meth:`send`; ``send(link, identity, msg)`` sends
    on the ``"client"`` or ``"endpoint"`` link; ``endpoint_users`` is the loop's live map of
    endpoint sessions (identity -> user), only read here; ``check_connections()`` forgets the
    sessions whose connection ended, before acks go out."""

    def __init__(
        self,
        wake: Callable[[], None],
        send: Callable[[str, bytes, m.Message], None],
        endpoint_users: dict[bytes, str],
        check_connections: Callable[[], None],
    ):
        self._committed: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = wake
        self._send = send
        self._endpoint_users = endpoint_users
        self._check_connections = check_connections
        # results' acks waiting to go to endpoints: identity -> (its session's user, task ids)
        self.endpoint_waiting: dict[bytes, tuple[str, list[bytes]]] = {}
        self.endpoint_due: float | None = None  # when they go at the latest (None: none wait)

    def committed(self, acks: list[tuple[str, bytes, bytes]]) -> None:
        """Called on the writer thread: hand committed ids to the loop."""
        self._committed.put(acks)
        self._wake()

    def send(self, finished) -> None:
        """On the loop: send the clients' acks of what was committed; the endpoints' wait (see
        :meth:`send_endpoint_acks`). ``finished``: the ids of tasks whose result has gone."""
        grouped: dict[tuple[str, bytes], list[bytes]] = {}
        # A client forgets a task once its result arrives: no Accepted for a task whose result
        # has gone (a serial caller's tasks usually have), so no wake-up of the client for it.
        # A result lost with its connection is found again: the client resends what it kept
        # and asks for its pending results after reconnecting; a resend's ack ("client-again")
        # is always sent.
        while True:
            try:
                acks = self._committed.get_nowait()
            except queue.Empty:
                break
            for link, identity, task_id in acks:
                if link == "client" and task_id in finished:
                    continue
                grouped.setdefault((link, identity), []).append(task_id)
        for (link, identity), ids in grouped.items():
            if link != "endpoint":  # "client", "client-again"
                self._send("client", identity, m.Accepted(ids))
                continue
            user = self._endpoint_users.get(identity)
            if user is None:  # its session ended: it resends them after its next Hello
                continue
            waiting = self.endpoint_waiting.get(identity)
            if waiting is None or waiting[0] != user:
                waiting = self.endpoint_waiting[identity] = (user, [])
            waiting[1].extend(ids)
        if self.endpoint_waiting and self.endpoint_due is None:
            self.endpoint_due = time.monotonic() + ENDPOINT_ACK_DELAY_S
        if sum(len(ids) for _, ids in self.endpoint_waiting.values()) >= ENDPOINT_ACK_BATCH:
            self.send_endpoint_acks()

    def send_endpoint_acks(self) -> None:
        """Send the results' acks that wait, each only to the session of the user it was for."""
        waiting, self.endpoint_waiting = self.endpoint_waiting, {}
        self.endpoint_due = None
        self._check_connections()
        for identity, (user, ids) in waiting.items():
            if self._endpoint_users.get(identity) == user:
                self._send("endpoint", identity, m.Accepted(ids))
