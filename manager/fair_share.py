"""Fair share of an endpoint between users, at the manager: how many of a user's tasks may be in
flight on an endpoint, and how that window shrinks while users compete for a busy manager.

    submit --> room(ep, user): that many go now; the rest wait here (``ep.held``, state queued)
    result --> a place frees --> at Flush: held tasks go, oldest first, user by user
    LoopLoad (the loop's busy fraction, every LOAD_SAMPLE_S) --> ShareWindow.sample

Why at the manager and not only at the endpoint (which serves its queue round-robin between
users): when one user's flood of no-ops saturates the manager's loop, another user's call waits
behind her frames in the manager's own sockets (her results and her refills), where no queue
order helps. So the manager bounds what each user has in flight on an endpoint (``max_inflight``,
at least twice the endpoint's workers: a single user still fills a large endpoint), and while
more than one user submits to an endpoint it shrinks that window until its loop is busy about
half of the time at most (halved when busy, grown by a quarter when idle), so a light user's
frames find the loop waiting in poll, not behind a backlog. A user alone on an endpoint is never
paced by load. The cost of contention falls on the heavy user's throughput, not on anyone's
latency; a light user (fewer tasks in flight than the window) is never held.

Here: the window (:class:`ShareWindow`), the functions on an endpoint's share, and the Router's
side of it (:class:`FairShareMixin`: releasing held tasks, load samples). Sans-I/O like the
Router: the time and the load come with the events.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

from dlhub.protocol import messages as m

from . import events as ev

if TYPE_CHECKING:
    from .endpoints import EndpointState

MAX_INFLIGHT_PER_USER = 4096  # a user's tasks in flight on one endpoint (more wait at the manager)
CONTENTION_S = 1.0  # users who submitted to an endpoint this recently compete for it
LOAD_SAMPLE_S = 0.1  # how often the loop reports its busy fraction
WINDOW_START = 64  # the window when users start to compete (the heavy user's in-flight drains to it)
WINDOW_MIN = 8  # never fewer in flight per user: batches and prefetch still work
WINDOW_GROWTH_CAP = 1 << 20
BUSY_HIGH = 0.5  # loop busier than this while users compete: halve the window
BUSY_LOW = 0.3  # idler than this: grow it by a quarter
RATE_START = 2000.0  # tasks a second competing users' held tasks go at, when contention starts
RATE_MIN = 200.0
RATE_CAP = 1e7
LIGHT_INFLIGHT = 4  # a user with at most this many in flight and none held is not paced
BURST_S = 0.005  # tokens kept: this much of the rate (so releases come steadily, not in bursts)


class ShareWindow:
    """What a user may have in flight on an endpoint others compete for, and how fast more may
    go, both sized by the manager loop's load: AIMD, as a congestion window, whose signal is the
    loop's busy fraction rather than loss. The rate is what bounds the load (a window alone does
    not: with few tasks in flight each message carries fewer, and costs more per task)."""

    def __init__(self) -> None:
        self.size = WINDOW_START
        self.rate = RATE_START  # tasks a second, all competing users' releases together
        self.tokens = 0.0
        self._t = 0.0

    def sample(self, busy: float, contended: bool) -> bool:
        """Take one load sample; True when the window grew (held tasks may go now)."""
        if not contended:
            # the next contention starts small: the heavy user's backlog in flight drains first
            self.size, self.rate = WINDOW_START, RATE_START
            return False
        if busy > BUSY_HIGH:
            self.size = max(WINDOW_MIN, self.size // 2)
            self.rate = max(RATE_MIN, self.rate / 2)
            return False
        if busy < BUSY_LOW:
            self.size = min(WINDOW_GROWTH_CAP, self.size + max(1, self.size // 4))
            self.rate = min(RATE_CAP, self.rate * 1.25)
            return True
        return False

    def take(self, wanted: int, now: float) -> int:
        """How many of ``wanted`` tasks of competing users may go now (tokens refill at ``rate``,
        a burst of at most BURST_S of it)."""
        burst = max(1.0, self.rate * BURST_S)
        self.tokens = min(burst, self.tokens + max(0.0, now - self._t) * self.rate)
        self._t = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


def contended(ep: EndpointState, user: str | None, now: float) -> bool:
    """Whether a user other than ``user`` submitted to ``ep`` within ``CONTENTION_S`` (``user``
    None: whether any two did)."""
    others = 0
    for who, when in ep.recent.items():
        if who != user and now - when < CONTENTION_S:
            others += 1
            if user is not None or others > 1:
                return True
    return False


def forget_idle_users(ep: EndpointState, now: float) -> None:
    """Drop users who have not submitted to ``ep`` for a while (keeps ``recent`` small)."""
    stale = [who for who, when in ep.recent.items() if now - when >= CONTENTION_S]
    for who in stale:
        del ep.recent[who]


def cap(ep: EndpointState, max_inflight: int) -> int:
    """The most of one user's tasks in flight on ``ep`` when nobody competes: ``max_inflight``,
    or twice the endpoint's workers when that is more."""
    workers = ep.info.get("workers") if ep.info else None
    return max(max_inflight, 2 * workers) if isinstance(workers, int) else max_inflight


def grant(
    ep: EndpointState, user: str, wanted: int, now: float, max_inflight: int, window: ShareWindow
) -> int:
    """How many of ``wanted`` more tasks of ``user`` may go to ``ep`` now: up to its cap in flight
    alone; while others submit there too, up to the window and at the window's rate."""
    inflight = ep.inflight_by_user.get(user, 0)
    if len(ep.recent) == 1 and inflight + wanted <= max_inflight:
        return wanted  # the common case: nobody else submits here, and they fit the least cap
    free = cap(ep, max_inflight) - inflight
    if free <= 0:
        return 0
    if not contended(ep, user, now):
        return min(wanted, free)
    free = min(free, window.size - inflight, wanted)
    if free <= 0:
        return 0
    if user not in ep.held and inflight + free <= LIGHT_INFLIGHT:
        return free  # a light user (a few calls, none waiting): never paced
    return window.take(free, now)


def hold(ep: EndpointState, user: str, task_ids: list[bytes]) -> None:
    """Keep ``task_ids`` of ``user`` at the manager until ``ep`` has room for them."""
    ep.held.setdefault(user, {}).update(dict.fromkeys(task_ids))


def unhold(ep: EndpointState, user: str, task_id: bytes) -> bool:
    """Take one held task back (it was cancelled); False when it was not held."""
    queue = ep.held.get(user)
    if queue is None or task_id not in queue:
        return False
    del queue[task_id]
    if not queue:
        del ep.held[user]
    return True


def releasable(ep: EndpointState, now: float, max_inflight: int, window: ShareWindow) -> list[bytes]:
    """Held task ids that may go to ``ep`` now, each user's oldest first, taken off ``ep.held``."""
    out: list[bytes] = []
    for user in list(ep.held):
        queue = ep.held[user]
        free = grant(ep, user, len(queue), now, max_inflight, window)
        if free <= 0:
            continue
        ids = list(islice(queue, free))
        for task_id in ids:
            del queue[task_id]
        if not queue:
            del ep.held[user]
        out.extend(ids)
    return out


def held_count(ep: EndpointState) -> int:
    return sum(len(queue) for queue in ep.held.values())


class FairShareMixin:
    """The Router's handling of held tasks (mixed into the Router, whose state it works on, as
    ``.endpoints.EndpointsMixin`` is). These are the attributes it uses:"""

    endpoints: dict[str, EndpointState]
    tasks: dict[bytes, Any]
    share: ShareWindow
    max_inflight_per_user: int
    _release_due: set[str]  # endpoints where held tasks may have room now
    _holding: set[str]  # endpoints with held tasks (may be stale: then none)
    _paced: bool  # users compete and tasks are held: released at the window's rate
    _time: Callable[[], float]
    _write: Callable[[ev.Persist], None]
    _send_tasks: Callable[[EndpointState, list[list]], None]

    def holding(self) -> bool:
        """Whether tasks wait here for their user's fair share (the loop then samples its load,
        which releases them, at least every LOAD_SAMPLE_S)."""
        return bool(self._holding)

    def paced(self) -> bool:
        """Whether held tasks go at the window's rate (the loop then turns every millisecond)."""
        return self._paced

    def loop_load(self, busy: float) -> None:
        """The loop's busy fraction since the last sample: sizes the window of competing users."""
        now = self._time()
        competing = any(ep.recent and contended(ep, None, now) for ep in self.endpoints.values())
        self.share.sample(busy, competing)
        self._release_due.update(self._holding)
        self._paced = competing and bool(self._holding)

    def _release_held(self) -> None:
        """At Flush: send what has room, on every endpoint where a place freed (and, while
        paced, on every endpoint holding tasks: the rate's tokens come with time)."""
        if self._paced:
            self._release_due |= self._holding
        for name in self._release_due:
            ep = self.endpoints.get(name)
            if ep is not None:
                self._release(ep)
                if not ep.held:
                    self._holding.discard(name)
        self._release_due = set()

    def _release(self, ep: EndpointState) -> None:
        """Send the held tasks of ``ep`` that its users' fair share has room for now."""
        if not ep.held or not ep.connected or ep.identity is None:
            return
        now = self._time()
        records, updates = [], []
        for task_id in releasable(ep, now, self.max_inflight_per_user, self.share):
            entry = self.tasks.get(task_id)
            if entry is None or entry.state in m.TERMINAL_STATES:
                continue
            entry.state = "dispatched"
            ep.inflight[task_id] = None
            ep.inflight_by_user[entry.owner] = ep.inflight_by_user.get(entry.owner, 0) + 1
            records.append(entry.record)
            updates.append((task_id, {"state": "dispatched", "t_dispatched": now}))
        if records:
            self._write(ev.PersistUpdates(updates))
            self._send_tasks(ep, records)
