"""The log's byte-range lock: a long wait is reported to the operator, a free lock is silent."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from engine.log import locking
from engine.log.locking import RangeLock


def test_a_free_lock_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = RangeLock(str(tmp_path / "lock"))
    with caplog.at_level(logging.DEBUG, logger="engine"):
        for _ in range(100):
            lock.acquire()
            lock.release()
    lock.close()
    assert caplog.records == []


def test_a_long_wait_for_the_lock_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(locking, "SLOW_WAIT", 0.2)
    path = str(tmp_path / "lock")
    holder, waiter = RangeLock(path), RangeLock(path)
    holder.acquire()  # another open file description: it excludes the waiter as a host would
    releaser = threading.Timer(0.4, holder.release)
    releaser.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="engine.log"):
        waiter.acquire()
    waited = time.monotonic() - started
    waiter.release()
    releaser.join()
    holder.close()
    waiter.close()
    assert waited >= 0.3
    [record] = caplog.records
    assert record.name == "engine.log"
    assert path in record.getMessage() and "waited" in record.getMessage()
    assert record.path == path  # type: ignore[attr-defined]  # structured context (extra=)


def test_a_short_wait_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(locking, "SLOW_WAIT", 5.0)
    path = str(tmp_path / "lock")
    holder, waiter = RangeLock(path), RangeLock(path)
    holder.acquire()
    releaser = threading.Timer(0.1, holder.release)
    releaser.start()
    with caplog.at_level(logging.DEBUG, logger="engine"):
        waiter.acquire()
    waiter.release()
    releaser.join()
    holder.close()
    waiter.close()
    assert caplog.records == []
