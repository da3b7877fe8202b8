"""Group commit: the threads of one process share each durable write of the log.

A caller queues its request; if no thread is committing it becomes the leader, waits a moment
for the other callers (:meth:`GroupCommit._gather`), takes the whole queue as one batch and
commits it (one write, one sync). Every other caller sleeps on a lock of its own until its
request is committed, or until it is picked to lead the next batch.

The callers of a batch are woken one after the other, each by the one before it, rather than
all at once: they need the GIL in turn anyway, and fifteen threads woken together only queue
for it, each paying extra sleeps and wake-ups (twice the context switches per event, measured
with 16 threads). A caller woken this way is already done, so the chain costs it nothing.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")

_CALLER_WINDOW = 0.05  # a thread that appended this recently counts as a concurrent caller


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(slots=True, eq=False)
class Request(Generic[P]):
    """One caller's work; the commit function fills in ``seqs`` or ``error``."""

    payload: P
    seqs: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False
    # Only a caller that waits has one (a leader's own request does not): held from the time
    # it queues until its request is done, or until its caller is to lead the next batch.
    turn: threading.Lock = field(init=False)
    then: Request[P] | None = None  # the next caller of the same batch, woken by this one


class GroupCommit(Generic[P]):
    """Runs requests through ``commit(batch)``, one batch at a time, one leader at a time."""

    def __init__(self, commit: Callable[[list[Request[P]]], None], delay: float) -> None:
        self._commit = commit
        self._delay = delay
        self._lock = threading.Lock()
        self._arrivals = threading.Condition(self._lock)  # a gathering leader waits here
        self._queue: list[Request[P]] = []
        self._leading = False  # a leader is gathering or committing
        self._gathering = False
        self._want = 0  # callers the gathering leader waits for
        self._callers: dict[int, float] = {}  # thread -> when it last submitted

    def submit(self, payload: P) -> list[int]:
        """Queue ``payload`` and return its sequence numbers once its batch is committed."""
        request: Request[P] = Request(payload)
        with self._lock:
            self._queue.append(request)
            self._callers[threading.get_ident()] = time.monotonic()
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                request.turn = _held_lock()
                if self._gathering and len(self._queue) >= self._want:
                    self._arrivals.notify()  # only the arrival that completes the group
        interrupted = None if lead else _wait_for_turn(request)
        if request.done:
            if request.then is not None:
                request.then.turn.release()
        else:
            interrupted = self._lead(request) or interrupted
        if interrupted is not None:
            raise interrupted
        if request.error is not None:
            raise request.error
        return request.seqs

    def _lead(self, own: Request[P]) -> BaseException | None:
        """Commit the queue as one batch, wake its first caller, hand over to the next leader.

        Returns an interrupt that arrived while gathering: the batch is committed first, since
        the callers in it wait for this thread and nobody else will commit their requests.
        """
        interrupted = None
        batch: list[Request[P]] = []
        try:
            with self._lock:
                try:
                    self._gather()
                except BaseException as e:
                    interrupted = e
                batch, self._queue = self._queue, []
            self._commit(batch)
        except BaseException as e:
            for request in batch:
                if request.error is None and not request.seqs:
                    request.error = e
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                self._leading = successor is not None
            for request in batch:
                request.done = True
            others = [request for request in batch if request is not own]
            for request, then in itertools.pairwise(others):
                request.then = then
            if others:
                others[0].turn.release()
            if successor is not None:
                successor.turn.release()
        return interrupted

    def _gather(self) -> None:
        """Before committing, wait a moment for the other callers that are appending.

        Under load, the callers one sync releases come back microseconds later, just after the
        next leader has started: the group splits in two and each sync covers half of it.
        Waiting up to ``delay`` for every thread that appended in the last ``_CALLER_WINDOW``
        seconds lets one sync cover them all (PostgreSQL's commit_delay). A lone caller never
        waits. Called with the lock held.
        """
        if len(self._queue) >= len(self._callers):
            return  # everyone is here (a lone caller, say): no need to look closer
        now = time.monotonic()
        stale = [t for t, seen in self._callers.items() if now - seen > _CALLER_WINDOW]
        for thread in stale:
            del self._callers[thread]
        self._want = len(self._callers)
        deadline = now + self._delay
        self._gathering = True
        try:
            while len(self._queue) < self._want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._arrivals.wait(remaining)
        finally:
            self._gathering = False


def _wait_for_turn(request: Request[P]) -> BaseException | None:
    """Sleep until our request is done or we are to lead; return any interrupt meanwhile.

    An interrupt (KeyboardInterrupt in the main thread) cannot cancel a request that may
    already be on its way to the disk, and the turn brings duties (waking the next caller,
    or leading) that nobody else would do: it is raised once they are done.
    """
    interrupted = None
    while True:
        try:
            request.turn.acquire()
            return interrupted
        except BaseException as e:
            interrupted = interrupted or e
