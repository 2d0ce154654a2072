"""Function code at the endpoint: the cache of code blobs, the tasks parked until theirs comes,
and the requests for it that the manager has not answered yet.

A helper the Scheduler composes (sans-IO, like :mod:`.batching`); which tasks are still alive and
what becomes of the ones released or failed is the Scheduler's.

    park(task, digest)  a task whose code is not here waits under its digest (``waiting``); the
                        digest is asked of the manager once (``requests``, an outbox)
    take_requests()     the digests to ask for now, remembered as one pending request (``asked``)
    add(blobs)          code came (a reply, or found locally): kept, and its tasks released
    answered(blobs)     a reply settles only the digests its own request asked for (the manager
                        answers in order): those it lacks are unknown there, their tasks fail; a
                        digest asked later is still pending (issue 11: it was failed as unknown)
    link_reset()        a new manager session lost the unanswered requests: ask again

The cache keeps the newest blobs up to ``CODE_CACHE_BYTES``; a task whose code was evicted before
it reached a worker parks again (it keeps its pool).
"""

from __future__ import annotations

from collections import OrderedDict, deque

CODE_CACHE_BYTES = 512 * 1024 * 1024


class CodeWait:
    def __init__(self) -> None:
        self.code: OrderedDict[str, bytes] = OrderedDict()  # digest -> blob, oldest first
        self.code_bytes = 0
        self.waiting: dict[str, list[bytes]] = {}  # digest -> the tasks parked for it, in order
        # code requests sent to the manager and not yet answered, oldest first: a reply settles
        # only the digests its own request asked for (the manager answers in order)
        self.asked: deque[frozenset[str]] = deque()
        self.requests: list[str] = []  # digests to ask for with the next request

    def add(self, blobs: dict[str, bytes]) -> list[bytes]:
        """Keep the blobs (evicting the oldest past the cache's size) and return the tasks that
        waited for them, in order."""
        released: list[bytes] = []
        for digest, blob in blobs.items():
            if digest not in self.code:
                self.code[digest] = blob
                self.code_bytes += len(blob)
            released += self.waiting.pop(digest, ())
        while self.code_bytes > CODE_CACHE_BYTES and len(self.code) > 1:
            digest, blob = self.code.popitem(last=False)
            self.code_bytes -= len(blob)
        return released

    def park(self, task_id: bytes, digest: str) -> None:
        """Park a task until its function's code is here; the code is asked of the manager once
        per digest."""
        waiting = self.waiting.get(digest)
        if waiting is None:
            self.waiting[digest] = [task_id]
            self.requests.append(digest)
        else:
            waiting.append(task_id)

    def take_requests(self) -> list[str]:
        """The digests to ask the manager for now, remembered as one pending request: its reply
        says nothing about digests asked later (issue 11: they were failed as unknown)."""
        asked, self.requests = self.requests, []
        if asked:
            self.asked.append(frozenset(asked))
        return asked

    def answered(self, blobs: dict[str, bytes]) -> list[str]:
        """Settle the request a reply answers (the oldest pending one that asked for everything
        in it) and return the digests it asked for and the reply lacks: unknown at the manager.
        Nothing for a reply to a request from before the link was reset."""
        request = next((r for r in self.asked if r.issuperset(blobs)), None)
        if request is None:  # asked before the link was reset (see link_reset)
            return []
        self.asked.remove(request)
        return [d for d in request if d not in blobs]

    def link_reset(self) -> None:
        """The manager link started a new session: requests not answered by now are lost with
        the old one (the manager answers in order), so everything still waiting is asked again."""
        self.asked.clear()
        self.requests = list(dict.fromkeys([*self.requests, *self.waiting]))
