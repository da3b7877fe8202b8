"""A follower is woken by appends of its own process at once, and by other processes' appends
within a bounded time, through inotify or a polling observer; it never blocks forever."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine.log import NewEvent, OperationLog
from engine.log.follow import LogFollower

APPEND_IN_ANOTHER_PROCESS = """
import sys, uuid
from engine.log import NewEvent, OperationLog
log = OperationLog.open(sys.argv[1], "host-b")
for i in range(int(sys.argv[2])):
    log.append([NewEvent(uuid.uuid4(), 1, "t", b"from b")])
"""


@pytest.fixture
def log(tmp_path: Path) -> OperationLog:
    return OperationLog.create(str(tmp_path / "log"), "host-a")


def test_own_appends_wake_a_waiter_at_once(log: OperationLog) -> None:
    with LogFollower(log, poll_interval=30) as follower:
        threading.Timer(0.1, lambda: log.append([NewEvent(uuid.uuid4(), 1, "t", b"x")])).start()
        started = time.monotonic()
        assert follower.wait(0, timeout=20)
        assert time.monotonic() - started < 5  # far below the 30 s poll interval


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling-observer"])
def test_another_process_appends_are_followed(log: OperationLog, polling: bool) -> None:
    stop = threading.Event()
    seen: list[int] = []
    with LogFollower(log, poll_interval=0.3, polling=polling) as follower:

        def collect() -> None:
            for record in follower.follow(1, stop):
                seen.append(record.seq)
                if len(seen) == 20:
                    stop.set()

        reader = threading.Thread(target=collect)
        reader.start()
        subprocess.run(
            [sys.executable, "-c", APPEND_IN_ANOTHER_PROCESS, log.directory, "20"], check=True
        )
        reader.join(timeout=20)
        stop.set()
    assert not reader.is_alive()
    assert seen == list(range(1, 21))


def test_a_wait_with_nothing_appended_returns_false_after_its_timeout(log: OperationLog) -> None:
    with LogFollower(log, poll_interval=0.1) as follower:
        started = time.monotonic()
        assert not follower.wait(log.last_seq, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 5


def test_following_ends_when_the_follower_stops(log: OperationLog) -> None:
    follower = LogFollower(log, poll_interval=0.2).start()
    done = threading.Event()

    def drain() -> None:
        for _ in follower.follow(1):
            pass
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    time.sleep(0.3)
    follower.stop()
    assert done.wait(5)
