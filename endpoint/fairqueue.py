"""One pool's waiting tasks at the endpoint: a FIFO per submitting user, served round-robin.

    push(task, user) -> by_user[user].append(task); a user with nothing waiting joins ``ring``
    pop() -> the task at the head of ring[0]'s FIFO; that user goes to the back of the ring

So a user with 100,000 tasks waiting delays another's single call by at most one task a worker.
The Scheduler owns one per named pool (and inlines ``peek``/``pop`` on its hot path).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class FairQueue:
    """One pool's waiting tasks: a FIFO per user, served round-robin (one task a turn).

    ``ring`` holds the users with tasks waiting, the next to be served first; a user is in it
    exactly when its FIFO is non-empty. With one user this is a plain FIFO at the cost of a
    dict lookup and a rotate of a one-element deque per task. Iteration yields the tasks in the
    order dispatch would take them."""

    __slots__ = ("by_user", "ring")

    def __init__(self) -> None:
        self.by_user: dict[str | None, deque[bytes]] = {}
        self.ring: deque[str | None] = deque()

    def push(self, task_id: bytes, user: str | None, front: bool = False) -> None:
        """Queue a task at the back of its user's FIFO, or at the front (``front``: a requeued
        task, which was dispatched before anything waiting). A user with nothing waiting joins
        the ring at the back, or at the front for a requeued task; one already in the ring
        keeps its turn either way (a requeue never lets a user overtake another)."""
        q = self.by_user.get(user)
        if q is None:
            q = self.by_user[user] = deque()
            (self.ring.appendleft if front else self.ring.append)(user)
        (q.appendleft if front else q.append)(task_id)

    def push_front(self, items: list[tuple[bytes, str | None]]) -> None:
        """Put requeued tasks back, in order, at the front of their users' FIFOs. Users with
        nothing waiting join the ring at the front in the order of their first task (their
        tasks were dispatched before anything now waiting); the others keep their turn."""
        joined = set()
        for task_id, user in reversed(items):
            q = self.by_user.get(user)
            if q is None:
                q = self.by_user[user] = deque()
                joined.add(user)
            q.appendleft(task_id)
        if joined:
            self.ring.extendleft(reversed(list(dict.fromkeys(u for _, u in items if u in joined))))

    def peek(self) -> bytes:
        """The task dispatch takes next (the queue must not be empty)."""
        return self.by_user[self.ring[0]][0]

    def pop(self, served: bool = True) -> bytes:
        """Take the next task; ``served``: it was dispatched, so its user's turn ends (False:
        a cancelled task dropped, which costs its user no turn)."""
        user = self.ring[0]
        q = self.by_user[user]
        task_id = q.popleft()
        if not q:
            self.ring.popleft()
            del self.by_user[user]
        elif served:
            self.ring.rotate(-1)
        return task_id

    def clear(self) -> None:
        self.by_user.clear()
        self.ring.clear()

    def users(self) -> dict[str | None, int]:
        """Tasks waiting per user (for status)."""
        return {user: len(q) for user, q in self.by_user.items()}

    def __bool__(self) -> bool:
        return bool(self.ring)

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_user.values())

    def __iter__(self) -> Iterator[bytes]:
        iters = [iter(self.by_user[user]) for user in self.ring]
        while iters:
            alive = []
            for it in iters:
                for task_id in it:
                    yield task_id
                    alive.append(it)
                    break
            iters = alive
