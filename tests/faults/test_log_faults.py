"""The log on real faulty storage: a full filesystem, a read-only one, a cut or removed log.

What must hold (architecture §6): an append that raised left nothing any reader takes as
committed; one that returned is kept; a log shorter than what was committed is damage, never a
torn tail to cut; a log removed under a running host is noticed at its next append.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.errors import (
    CommitUnknown,
    LogCorrupted,
    LogMissing,
    StorageFull,
    StorageReadOnly,
)
from engine.log import NewEvent, OperationLog
from engine.log import space as log_space
from engine.log.segments import segment_path
from tests.faults.smallfs import SmallFs, eio

KiB = 1024


def states(log_dir: str) -> list[tuple[str, int]]:
    with OperationLog.open(log_dir, "auditor") as log:
        return [(str(r.originator_id), r.originator_version) for r in log.read()]


def append_from_threads(
    log: OperationLog, threads: int, per_thread: int, size: int
) -> tuple[list[tuple[str, int]], list[BaseException]]:
    """``threads`` callers append ``per_thread`` transactions of two ``size``-byte events each
    at once (group commits of several callers); return what was acknowledged, and the errors."""
    acknowledged: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)
    lock = threading.Lock()

    def caller() -> None:
        aggregate = str(uuid.uuid4())
        version = 0
        start.wait()
        for _ in range(per_thread):
            events = [
                NewEvent(aggregate, version + 1, "Happened", os.urandom(size)),
                NewEvent(aggregate, version + 2, "Happened", os.urandom(size)),
            ]
            try:
                log.append(events)
            except (StorageFull, CommitUnknown) as e:
                with lock:
                    errors.append(e)
                continue
            version += 2
            with lock:
                acknowledged.extend([(aggregate, version - 1), (aggregate, version)])

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return acknowledged, errors


@pytest.mark.parametrize("allocate_first", [True, False], ids=["allocated", "plain-write"])
def test_a_group_commit_on_a_full_filesystem_commits_exactly_what_it_acknowledged(
    small_fs: Callable[..., SmallFs], monkeypatch: pytest.MonkeyPatch, allocate_first: bool
) -> None:
    """Eight callers append until the filesystem is full. Without allocating first, the
    group's write comes up short and must be undone; either way, every record read back is one
    that a caller was told was committed, and every one it was told of is there."""
    if not allocate_first:
        monkeypatch.setattr(log_space, "_fallocate", None)
    fs = small_fs(16)
    log_dir = os.path.join(fs.path, "log")
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([NewEvent("before", 1, "Happened", b"x")])
        fs.fill(leave=600 * KiB)
        acknowledged, errors = append_from_threads(log, threads=8, per_thread=40, size=3 * KiB)
        assert errors, "the filesystem never filled up"
        assert all(isinstance(e, StorageFull) for e in errors), errors
        assert sorted(states(log_dir)[1:]) == sorted(acknowledged)

        # Space comes back: the same log appends again, without a reconnect.
        fs.unfill()
        assert log.append([NewEvent("after", 1, "Happened", b"y")])
    assert states(log_dir)[-1] == ("after", 1)


def test_a_single_append_on_a_full_filesystem_fails_cleanly_and_heals(
    small_fs: Callable[..., SmallFs],
) -> None:
    fs = small_fs(16)
    log_dir = os.path.join(fs.path, "log")
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([NewEvent("a", 1, "Happened", b"x")])
        fs.fill(leave=0)
        size_before = os.path.getsize(segment_path(log_dir, 1))
        with pytest.raises(StorageFull) as raised:
            log.append([NewEvent("a", 2, "Happened", os.urandom(512 * KiB))])
        assert raised.value.code == "storage_full"
        assert os.path.getsize(segment_path(log_dir, 1)) == size_before
        assert log.read()[-1].originator_version == 1  # reads go on
        fs.unfill()
        assert log.append([NewEvent("a", 2, "Happened", b"y")]) == [2]
    assert states(log_dir) == [("a", 1), ("a", 2)]


def test_a_read_only_filesystem_fails_appends_and_still_reads(
    small_fs: Callable[..., SmallFs],
) -> None:
    fs = small_fs(16)
    log_dir = os.path.join(fs.path, "log")
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([NewEvent("a", 1, "Happened", b"x")])
        fs.force_read_only()
        with pytest.raises(StorageReadOnly):
            log.append([NewEvent("a", 2, "Happened", b"y")])
        assert [r.originator_version for r in log.read()] == [1]
        # An auditor opens the read-only log and reads it.
        with OperationLog.open(log_dir, "auditor") as other:
            assert [r.originator_version for r in other.read()] == [1]


def cut_log(tmp_path: Path) -> tuple[str, int, int]:
    """A log of 20 records by host-a (its witness names record 20); return it, the size of
    its segment and where record 20 begins."""
    log_dir = str(tmp_path / "log")
    with OperationLog.create(log_dir, "host-a") as log:
        for version in range(1, 21):
            log.append([NewEvent("a", version, "Happened", b"x" * 100)])
        last_start = log._offsets[19]
    return log_dir, os.path.getsize(segment_path(log_dir, 1)), last_start


@pytest.mark.parametrize("where", ["mid-record", "record boundary"])
def test_a_log_cut_after_its_records_were_committed_is_damage_and_nothing_is_cut(
    tmp_path: Path, where: str
) -> None:
    log_dir, _, last_start = cut_log(tmp_path)
    cut = last_start + 7 if where == "mid-record" else last_start
    os.truncate(segment_path(log_dir, 1), cut)
    with pytest.raises(LogCorrupted) as raised:
        OperationLog.open(log_dir, "host-b")
    assert "host 'host-a' committed records up to sequence 20" in raised.value.message
    assert (raised.value.segment, raised.value.offset) == (1, last_start)
    assert os.path.getsize(segment_path(log_dir, 1)) == cut  # nothing was cut
    assert not os.path.exists(os.path.join(log_dir, "torn"))


def test_a_log_cut_under_a_running_host_is_damage_at_its_next_append(tmp_path: Path) -> None:
    log_dir, _, last_start = cut_log(tmp_path)
    with OperationLog.open(log_dir, "host-b") as log:
        os.truncate(segment_path(log_dir, 1), last_start + 7)
        with pytest.raises(LogCorrupted):
            log.append([NewEvent("b", 1, "Happened", b"y")])
    assert os.path.getsize(segment_path(log_dir, 1)) == last_start + 7


def test_a_removed_last_segment_is_damage(tmp_path: Path) -> None:
    log_dir = str(tmp_path / "log")
    with OperationLog.create(log_dir, "host-a", segment_size=4096) as log:
        for version in range(1, 60):
            log.append([NewEvent("a", version, "Happened", b"x" * 200)])
        last = log._segments[-1].number
    assert last >= 2
    os.unlink(segment_path(log_dir, last))
    with pytest.raises(LogCorrupted):
        OperationLog.open(log_dir, "host-b")


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_log_directory_removed_under_a_running_host_is_noticed_at_the_next_append(
    tmp_path: Path, how: str
) -> None:
    log_dir = str(tmp_path / "log")
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([NewEvent("a", 1, "Happened", b"x")])
        shutil.move(log_dir, str(tmp_path / "elsewhere"))
        if how == "replaced":
            with OperationLog.create(log_dir, "host-b") as other:
                other.append([NewEvent("b", 1, "Happened", b"x")])
        with pytest.raises(LogMissing):
            log.append([NewEvent("a", 2, "Happened", b"y")])
    assert states(str(tmp_path / "elsewhere")) == [("a", 1)]
    if how == "replaced":
        assert states(log_dir) == [("b", 1)]


def test_a_segment_that_is_a_directory_or_a_link_is_damage(tmp_path: Path) -> None:
    log_dir = str(tmp_path / "log")
    with OperationLog.create(log_dir, "host-a", segment_size=4096) as log:
        for version in range(1, 60):
            log.append([NewEvent("a", version, "Happened", b"x" * 200)])
    second = segment_path(log_dir, 2)
    os.rename(second, second + ".saved")
    os.mkdir(second)
    with pytest.raises(LogCorrupted, match="not a regular file"):
        OperationLog.open(log_dir, "host-b")
    os.rmdir(second)
    os.symlink(second + ".saved", second)
    with pytest.raises(LogCorrupted, match="symbolic link"):
        OperationLog.open(log_dir, "host-b")


def test_a_failed_sync_that_cannot_be_undone_is_settled_by_reading_the_log_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync fails, and so does cutting the write off: the records stay. Read back and
    synced under the lock, they are committed, and the callers are told so."""
    log_dir = str(tmp_path / "log")
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([NewEvent("a", 1, "Happened", b"x")])

        monkeypatch.setattr("engine.log.store.os.fdatasync", eio)
        monkeypatch.setattr("engine.log.space.os.ftruncate", eio)
        assert log.append([NewEvent("a", 2, "Happened", b"y")]) == [2]
        monkeypatch.undo()
        assert log.append([NewEvent("a", 3, "Happened", b"z")]) == [3]
    assert states(log_dir) == [("a", 1), ("a", 2), ("a", 3)]


def test_a_commit_whose_outcome_cannot_be_known_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_dir = str(tmp_path / "log")
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([NewEvent("a", 1, "Happened", b"x")])

        monkeypatch.setattr("engine.log.store.os.fdatasync", eio)
        monkeypatch.setattr("engine.log.store.os.fsync", eio)
        monkeypatch.setattr("engine.log.space.os.ftruncate", eio)
        with pytest.raises(CommitUnknown):
            log.append([NewEvent("a", 2, "Happened", b"y")])
        monkeypatch.undo()
        # The storage works again: the next append reads the tail first and goes on after it.
        assert log.append([NewEvent("b", 1, "Happened", b"z")]) == [3]
    assert states(log_dir) == [("a", 1), ("a", 2), ("b", 1)]


@pytest.mark.parametrize("where", ["mid-record", "record boundary"])
def test_verify_calls_a_log_cut_after_its_records_were_committed_damaged(
    tmp_path: Path, where: str
) -> None:
    log_dir, _, last_start = cut_log(tmp_path)
    os.truncate(segment_path(log_dir, 1), last_start + 7 if where == "mid-record" else last_start)
    done = subprocess.run(
        [sys.executable, "-m", "log_tools", "verify", log_dir, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "damaged"
    assert "committed records up to sequence 20" in report["damage"]["detail"]
    assert (report["damage"]["segment"], report["damage"]["offset"]) == (1, last_start)
