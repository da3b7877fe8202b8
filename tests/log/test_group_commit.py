"""The group commit under the log's appends, with a fake commit that numbers requests in memory."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from engine.log import group_commit
from engine.log.group_commit import GroupCommit, Request


class FakeLog:
    """Gives each request of a batch the next number, and keeps every batch's payloads."""

    def __init__(
        self, fail_on: Callable[[str], bool] = lambda payload: False, sync_seconds: float = 0.0
    ) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.sync_seconds = sync_seconds
        self.gate = threading.Event()
        self.gate.set()
        self._next = 1

    def commit(self, batch: list[Request[str]]) -> None:
        self.gate.wait()
        time.sleep(self.sync_seconds)  # like a disk sync, it lets the other threads run
        self.batches.append([request.payload for request in batch])
        if any(self.fail_on(request.payload) for request in batch):
            raise OSError("the disk went away")
        for request in batch:
            request.seqs = [self._next]
            self._next += 1


def run_threads(target: Callable[[int], object], count: int) -> None:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a caller was never woken"


class Interrupted(Exception):
    pass


@contextmanager
def interrupt_main_thread_after(seconds: float) -> Iterator[None]:
    """Signal the main thread itself (a process-wide signal may land on another thread, which
    would not wake the main thread's wait)."""

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(seconds, signal.pthread_kill, args=(main, signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_each_of_sixteen_threads_gets_back_the_numbers_of_its_own_requests() -> None:
    log = FakeLog()
    group = GroupCommit(log.commit, delay=0.001)
    got: dict[int, list[int]] = {}

    def submit_fifty(n: int) -> None:
        got[n] = [seq for i in range(50) for seq in group.submit(f"{n}-{i}")]

    run_threads(submit_fifty, 16)
    numbered = [payload for batch in log.batches for payload in batch]
    for n, seqs in got.items():
        assert [numbered[seq - 1] for seq in seqs] == [f"{n}-{i}" for i in range(50)]
    assert len(numbered) == 16 * 50


def test_threads_submitting_together_share_commits() -> None:
    log = FakeLog(sync_seconds=0.001)
    group = GroupCommit(log.commit, delay=0.05)
    start = threading.Barrier(8)
    run_threads(lambda n: [start.wait(), *(group.submit(f"{n}-{i}") for i in range(50))], 8)
    assert len(log.batches) <= 8 * 50 / 4, "the leaders did not gather the other callers"


def test_a_lone_caller_does_not_wait_for_the_commit_delay() -> None:
    group = GroupCommit(FakeLog().commit, delay=10.0)
    started = time.monotonic()
    for i in range(3):
        assert group.submit(str(i)) == [i + 1]
    assert time.monotonic() - started < 5.0


def test_a_failed_commit_fails_every_request_of_its_batch_and_later_ones_still_commit() -> None:
    log = FakeLog(fail_on=lambda payload: payload == "doomed")
    group = GroupCommit(log.commit, delay=0.05)
    log.gate.clear()  # hold the first batch so that the others queue up behind it
    errors: dict[str, BaseException] = {}
    results: dict[str, list[int]] = {}

    def submit(payload: str) -> None:
        try:
            results[payload] = group.submit(payload)
        except OSError as e:
            errors[payload] = e

    first = threading.Thread(target=submit, args=("first",))
    first.start()
    while not group._leading:
        time.sleep(0.001)
    waiting = [threading.Thread(target=submit, args=(p,)) for p in ("doomed", "neighbour")]
    for t in waiting:
        t.start()
    while len(group._queue) < 2:
        time.sleep(0.001)
    log.gate.set()
    for t in [first, *waiting]:
        t.join(timeout=30)
    assert results == {"first": [1]}
    assert set(errors) == {"doomed", "neighbour"}, "the failed batch had both"
    assert group.submit("later") == [2]


def test_an_interrupted_caller_is_still_committed_and_still_wakes_the_next_caller() -> None:
    log = FakeLog()
    group = GroupCommit(log.commit, delay=0.5)
    log.gate.clear()
    results: dict[str, list[int]] = {}

    def submit(payload: str) -> None:
        results[payload] = group.submit(payload)

    def enqueue(payload: str) -> threading.Thread:
        t = threading.Thread(target=submit, args=(payload,))
        before = len(group._queue)
        t.start()
        while len(group._queue) == before:
            time.sleep(0.001)
        return t

    leader = threading.Thread(target=submit, args=("leader",))
    leader.start()
    while not group._leading:
        time.sleep(0.001)
    # The next batch: a thread that will lead it, the main thread, then one woken after it.
    others = [enqueue("next leader")]
    threading.Timer(0.3, lambda: others.append(enqueue("after main"))).start()
    threading.Timer(0.6, log.gate.set).start()
    with pytest.raises(Interrupted), interrupt_main_thread_after(0.1):
        group.submit("main")
    for t in [leader, *others]:
        t.join(timeout=30)
        assert not t.is_alive(), "a caller was never woken"
    assert ["next leader", "main", "after main"] in log.batches
    assert set(results) == {"leader", "next leader", "after main"}
    assert group.submit("later") == [5]


def test_an_interrupted_gathering_leader_commits_what_it_gathered_then_raises() -> None:
    log = FakeLog()
    group = GroupCommit(log.commit, delay=5.0)
    # Another thread appended a moment ago, so the main thread's leader waits for it to come
    # back, which it never does.
    run_threads(lambda n: group.submit("other"), 1)
    with pytest.raises(Interrupted), interrupt_main_thread_after(0.01):
        group.submit("main")
    assert log.batches == [["other"], ["main"]]
    time.sleep(0.1)  # until the other thread no longer counts as a caller to wait for
    assert group.submit("later") == [3]


def test_the_caller_that_completes_a_group_commits_it_at_once_and_the_leader_returns_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(group_commit, "_CALLER_WINDOW", 60.0)  # however slow the machine
    log = FakeLog()
    committers: list[str] = []

    def commit(batch: list[Request[str]]) -> None:
        committers.append(threading.current_thread().name)
        log.commit(batch)

    group = GroupCommit(commit, delay=5.0)
    assert group.submit("warm") == [1]  # the main thread is a recent caller: leaders wait for it
    started = time.monotonic()
    results: dict[str, list[int]] = {}
    leader = threading.Thread(target=lambda: results.update(leader=group.submit("leader")))
    leader.start()
    while group._gatherer is None:
        time.sleep(0.001)
    results["completer"] = group.submit("completer")
    leader.join(timeout=30)
    assert time.monotonic() - started < 2.5, "the group waited out the commit delay"
    assert log.batches[-1] == ["leader", "completer"]
    assert committers[-1] == threading.current_thread().name
    assert results == {"leader": [2], "completer": [3]}


DELAY = 0.05


@pytest.fixture
def patient_group(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeLog, GroupCommit[str]]:
    """A group commit with a delay of DELAY whose leaders count every thread that appended in
    the last minute as a caller to wait for, however slow the machine."""
    monkeypatch.setattr(group_commit, "_CALLER_WINDOW", 60.0)
    log = FakeLog()
    return log, GroupCommit(log.commit, delay=DELAY)


def test_callers_coming_back_one_by_one_slower_than_the_delay_still_share_one_commit(
    patient_group: tuple[FakeLog, GroupCommit[str]],
) -> None:
    # Like the callers of a big batch woken one after the other on a busy machine: together
    # they take twice the delay to arrive, each gap well under it.
    log, group = patient_group
    callers = 6
    warm = threading.Barrier(callers)

    def come_back(n: int) -> None:
        group.submit(f"warm {n}")  # each thread a recent caller
        warm.wait()
        time.sleep(DELAY * 0.4 * n)
        group.submit(f"back {n}")

    started = time.monotonic()
    run_threads(come_back, callers)
    assert sorted(log.batches[-1]) == [f"back {n}" for n in range(callers)]
    assert time.monotonic() - started < DELAY * group_commit._MAX_GAPS + 1.0


def test_a_caller_that_stopped_appending_delays_a_group_by_a_bounded_wait(
    patient_group: tuple[FakeLog, GroupCommit[str]],
) -> None:
    log, group = patient_group
    run_threads(lambda n: group.submit("gone"), 1)  # a recent caller that never comes back
    started = time.monotonic()
    assert group.submit("main") == [2]
    waited = time.monotonic() - started
    assert DELAY <= waited < DELAY * group_commit._MAX_GAPS + 1.0
    assert log.batches == [["gone"], ["main"]]
