"""Group commit: the threads of one process share each durable write of the log.

A caller queues its request; if no thread is committing it becomes the leader and waits a
moment for the other callers (:meth:`GroupCommit._gather`). The caller whose arrival completes
the group commits it (one write, one sync), or the leader does once the moment is over. Every
other caller sleeps on a lock of its own until its request is committed, or until it is
picked to lead the next batch.

The completing caller commits rather than waking the leader to do it: it already holds the
GIL, while the leader would first have to be scheduled again, a wake-up that the whole group
waited for (about 20 us per batch with 16 threads, more on a loaded machine). The leader
sleeps on as a member of the batch.

The callers of a batch are woken one after the other, each by the one before it, rather than
all at once: they need the GIL in turn anyway, and fifteen threads woken together only queue
for it, each paying extra sleeps and wake-ups (twice the context switches per event, measured
with 16 threads). A caller woken this way is already done, so the chain costs it nothing.

Imports: the standard library only.
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
_MAX_GAPS = 8  # a leader gathers for at most this many commit delays

# What a caller does next (GroupCommit.submit).
_GATHER = "gather"  # lead: wait a moment for the other callers
_COMMIT = "commit"  # commit the queue as one batch
_SLEEP = "sleep"  # wait for our turn: our request done, or us to lead the next batch
_WOKEN = "woken"  # our turn came


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
    # Only a caller that sleeps has one (a lone caller's does not): held from the time it
    # sleeps until its request is done, or until its caller is to lead the next batch.
    turn: threading.Lock = field(init=False)
    then: Request[P] | None = None  # the next caller of the same batch, woken by this one


class GroupCommit(Generic[P]):
    """Runs requests through ``commit(batch)``, one batch at a time, one leader at a time."""

    def __init__(self, commit: Callable[[list[Request[P]]], None], delay: float) -> None:
        self._commit = commit
        self._delay = delay
        self._lock = threading.Lock()
        self._queue: list[Request[P]] = []
        self._leading = False  # a leader is gathering or committing
        self._gatherer: Request[P] | None = None  # the gathering leader's request
        self._want = 0  # callers the gathering leader waits for
        self._gather_started = 0.0  # when the gathering leader began to wait
        self._gather_time = 0.0  # how long a group takes to gather (moving average; none yet)
        self._callers: dict[int, float] = {}  # thread -> when it last submitted

    def submit(self, payload: P) -> list[int]:
        """Queue ``payload`` and return its sequence numbers once its batch is committed."""
        request: Request[P] = Request(payload)
        with self._lock:
            self._queue.append(request)
            now = self._callers[threading.get_ident()] = time.monotonic()
            commit = False
            if not self._leading:
                self._leading = True
                lead = True
            else:
                lead = False
                if self._gatherer is not None and len(self._queue) >= self._want:
                    self._gatherer = None  # we complete the group: we commit it
                    self._gather_time += (now - self._gather_started - self._gather_time) / 8
                    commit = True
                else:
                    request.turn = _held_lock()
        interrupted = None
        state = _COMMIT if commit else _GATHER if lead else _SLEEP
        while state != _COMMIT:
            if state == _GATHER:
                state, caught = self._gather(request)
                interrupted = interrupted or caught
            if state == _SLEEP:
                interrupted = _wait_for_turn(request) or interrupted
                state = _WOKEN
            if state == _WOKEN:
                if not request.done:
                    state = _GATHER  # we are to lead the next batch
                    continue
                if request.then is not None:
                    request.then.turn.release()
                break
        if state == _COMMIT:
            self._lead(request)
        if interrupted is not None:
            raise interrupted
        if request.error is not None:
            raise request.error
        return request.seqs

    def _lead(self, own: Request[P]) -> None:
        """Commit the queue as one batch, wake its first caller, hand over to the next leader.

        An interrupt that arrives meanwhile is raised by the callers of the batch, since they
        wait for this thread and nobody else will commit their requests or wake them.
        """
        batch: list[Request[P]] = []
        try:
            with self._lock:
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

    def _gather(self, own: Request[P]) -> tuple[str, BaseException | None]:
        """As the leader, wait a moment for the other callers that are appending.

        Under load, the callers one sync releases come back microseconds later, just after the
        next leader has started: the group splits in two and each sync covers half of it.
        Waiting for every thread that appended in the last ``_CALLER_WINDOW`` seconds lets one
        sync cover them all (PostgreSQL's commit_delay). A lone caller never waits.

        How long to wait is learnt, not fixed. The callers of the last batch come back one
        after the other (each woken by the one before it), so sixteen of them take 0.2 ms on a
        quiet machine and 0.8 ms or more on a busy virtual one, where a fixed 0.5 ms deadline
        committed 15% of the groups short and synced again for the stragglers (15,000 events/s
        against 17,000 with 16 threads). Waking the leader every 0.5 ms to see whether callers
        still come cost as much again: each wake-up takes the GIL from the chain. So the
        leader waits three times the usual gathering time (a moving average of the groups its
        callers completed; the tail is long), at least ``delay``; then, as long as callers
        still arrive, ``delay`` at a time, and never more than ``_MAX_GAPS`` delays in all. A
        caller that stopped appending costs that first wait, until it is ``_CALLER_WINDOW``
        old (docs/adr/0013-group-commit-gathers-for-a-learnt-time.md).

        Returns what to do next: ``_COMMIT`` the batch ourselves, or, when the arrival that
        completed the group took it over, ``_SLEEP`` on as one of its callers (our turn still
        held) or go on as a ``_WOKEN`` one (its commit is over and our turn came already); and
        an interrupt that ended the wait (raised once the commit is over).
        """
        with self._lock:
            if len(self._queue) >= len(self._callers):
                return _COMMIT, None  # everyone is here (a lone caller): no need to look closer
            now = time.monotonic()
            stale = [t for t, seen in self._callers.items() if now - seen > _CALLER_WINDOW]
            for thread in stale:
                del self._callers[thread]
            self._want = len(self._callers)
            if len(self._queue) >= self._want:
                return _COMMIT, None
            own.turn = _held_lock()
            self._gatherer = own
            self._gather_started = now
            arrived = len(self._queue)
            limit = now + self._delay * _MAX_GAPS
            wait = min(max(self._delay, 3 * self._gather_time), limit - now)
        interrupted, woken = None, False
        while True:
            try:
                # Nobody releases our turn while we gather: this sleeps until the wait is
                # over, or until the batch that took ours over is committed and our turn comes.
                woken = own.turn.acquire(timeout=wait)
            except BaseException as e:
                interrupted = e
            with self._lock:
                if self._gatherer is not own:  # taken over: we are a caller of that batch now
                    return (_WOKEN if woken else _SLEEP), interrupted
                wait = min(self._delay, limit - time.monotonic())
                if interrupted is None and len(self._queue) > arrived and wait > 0:
                    arrived = len(self._queue)  # callers still coming: wait for the rest
                    continue
                self._gatherer = None
                return _COMMIT, interrupted


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
