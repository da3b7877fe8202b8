"""The engine on real faulty storage: calls fail typed, reads go on, the engine heals by itself.

architecture §6: a full or read-only filesystem fails the calls that need to write with a typed
error; reads keep working from the projections; once space is freed, calls and executors resume
without a reconnect; a call that raised did not happen (no ghost image that nobody has an id
for); a log shorter than committed is damage, and nothing is cut.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import (
    CommitUnknown,
    EngineClosed,
    InvalidParameter,
    LogCorrupted,
    LogMissing,
    RepositoryNotConnected,
    StorageFull,
    StorageReadOnly,
)
from engine.log import OperationLog
from engine.log.segments import segment_path
from engine.log.witness import WITNESS_DIR
from tests.faults.smallfs import SmallFs, eio

MiB = 2**20


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Callable[..., StorageEngine]]:
    """Make engines (``engines(host_id, **options)``); every one is closed after the test."""
    made: list[StorageEngine] = []

    def make(host_id: str = "host-a", **options: object) -> StorageEngine:
        options.setdefault("state_dir", str(tmp_path / f"state-{host_id}-{len(made)}"))
        options.setdefault("poll_interval", 0.1)
        se = StorageEngine(host_id, **options)  # type: ignore[arg-type]
        made.append(se)
        return se

    yield make
    for se in made:
        se.close()


def repository(se: StorageEngine, path: str, name: str = "r1") -> str:
    os.makedirs(path, exist_ok=True)
    se.create_storage_repository("localfs-1.0", {"path": path})
    se.connect_storage_repository(name, "localfs-1.0", {"path": path})
    return name


def log_ids(repo_path: str) -> list[str]:
    """The image ids the log holds, read by an auditor that shares nothing with the engine."""
    with OperationLog.open(os.path.join(repo_path, "log"), "auditor") as log:
        return sorted(
            {str(r.originator_id) for r in log.read() if r.topic.startswith("strata.image.")}
        )


def fill_the_log(se: StorageEngine, repo: str) -> tuple[list[str], StorageFull]:
    """Create disks until a call fails for want of space; return the ids made and the error."""
    made = []
    for _ in range(20_000):
        try:
            made.append(se.create_virtual_disk(repo, MiB, user_data={"pad": "x" * 2000}))
        except StorageFull as e:
            return made, e
    raise AssertionError("the filesystem never filled up")


def disk_records(repo_path: str, image_id: str) -> int:
    """How many records of one image the log holds, read by an auditor."""
    with OperationLog.open(os.path.join(repo_path, "log"), "auditor") as log:
        return sum(1 for r in log.read() if str(r.originator_id) == image_id)


def failed_for_space(se: StorageEngine, repo: str, image_id: str) -> bool:
    return "full" in (se.get_image_status(repo, image_id).last_error or "")


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def disk_on_small_fs(
    small_fs: Callable[..., SmallFs], engines: Callable[..., StorageEngine], **user_data: str
) -> tuple[SmallFs, str, StorageEngine, str, str]:
    """A repository on a small filesystem, an engine on it, and a disk made there."""
    fs = small_fs(32)
    path = os.path.join(fs.path, "repo")
    se = engines()
    repo = repository(se, path)
    disk = se.create_virtual_disk(repo, MiB, user_data=user_data)
    assert se.wait_for_image(repo, disk, timeout=30).status == "optimized"
    return fs, path, se, repo, disk


def test_a_full_filesystem_fails_writes_keeps_reads_and_heals_by_itself(
    small_fs: Callable[..., SmallFs],
    engines: Callable[..., StorageEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="engine")
    fs, path, se, repo, disk = disk_on_small_fs(small_fs, engines)

    fs.fill(leave=0)
    made, error = fill_the_log(se, repo)
    assert error.code == "storage_full" and "full" in error.message
    # The executors go on failing the new disks' stages meanwhile (their small records may
    # still fit), so the refused call is told by the disk's own records, not the log's end.
    before = disk_records(path, disk)
    with pytest.raises(StorageFull):  # too big for what the last blocks have left
        se.set_user_data(repo, disk, {"pad": "x" * 60_000})
    assert disk_records(path, disk) == before  # nothing appended
    assert se.get_image_info(repo, disk).user_data == {}
    # Before the fault goes away, a stage has met it (the log line asserted below).
    assert wait_until(lambda: any(failed_for_space(se, repo, i) for i in made))
    # Reads answer from the projections meanwhile.
    assert {i.image_id for i in se.list_images(repo)} == {disk, *made}
    assert se.get_image_status(repo, disk).status == "optimized"
    assert log_ids(path) == sorted({disk, *made})  # no ghost: every id was handed out

    fs.unfill()  # the fault goes away: no reconnect, no restart
    snap = se.create_snapshot(repo, disk)
    assert se.wait_for_image(repo, snap, timeout=60).status == "optimized"
    # Disks whose data could not be made while the filesystem was full say so, and the
    # check offers to mend them; mended, they are whole.
    for image in made:
        status = se.wait_for_image(repo, image, timeout=60)
        assert status.status == "optimized" or "full" in (status.last_error or ""), status
    for fix in se.check_storage_repository(repo):
        if fix.type == "mend":
            se.fix_storage_repository(repo, fix)
    for image in made:
        assert se.wait_for_image(repo, image, timeout=60).status == "optimized"
    se.disconnect_storage_repository(repo)
    # An operator can read what happened: the stages that failed for want of space, by image.
    failed = [r for r in caplog.records if " failed on host " in r.message]
    assert failed and all(r.levelno == logging.WARNING for r in failed)
    assert {getattr(r, "image", None) for r in failed} <= set(made)


def test_many_callers_on_a_full_filesystem_leave_no_ghost_image(
    small_fs: Callable[..., SmallFs], engines: Callable[..., StorageEngine]
) -> None:
    """Ten threads create disks at once (group commits of several callers) until the
    filesystem is full: the log holds exactly the images whose calls returned."""
    fs = small_fs(32)
    path = os.path.join(fs.path, "repo")
    se = engines(run_executors=False)
    repo = repository(se, path)
    fs.fill(leave=256 * 1024)
    returned: list[str] = []
    failed: list[Exception] = []
    lock = threading.Lock()
    start = threading.Barrier(10)

    def caller() -> None:
        start.wait()
        for _ in range(2000):
            try:
                image = se.create_virtual_disk(repo, MiB, user_data={"pad": "y" * 3000})
            except (StorageFull, CommitUnknown) as e:
                with lock:
                    failed.append(e)
                if len(failed) > 50:
                    return
                continue
            with lock:
                returned.append(image)

    threads = [threading.Thread(target=caller) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed and all(isinstance(e, StorageFull) for e in failed)
    assert log_ids(path) == sorted(returned)
    assert sorted(i.image_id for i in se.list_images(repo)) == sorted(returned)


def test_a_read_only_filesystem_fails_writes_keeps_reads_and_admits_an_auditor(
    small_fs: Callable[..., SmallFs], engines: Callable[..., StorageEngine]
) -> None:
    fs, path, se, repo, disk = disk_on_small_fs(small_fs, engines, name="web01")
    fs.force_read_only()
    with pytest.raises(StorageReadOnly) as raised:
        se.create_virtual_disk(repo, MiB)
    assert raised.value.code == "storage_read_only"
    with pytest.raises(StorageReadOnly):
        se.set_user_data(repo, disk, {"name": "web02"})
    assert se.get_image_info(repo, disk).user_data == {"name": "web01"}
    assert se.get_image_status(repo, disk).status == "optimized"

    auditor = engines("auditor", run_executors=False)
    auditor.connect_storage_repository("r1", "localfs-1.0", {"path": path})
    assert [i.image_id for i in auditor.list_images("r1")] == [disk]
    auditor.close()
    se.disconnect_storage_repository(repo)  # no ExecutorFailed, no traceback


def test_a_full_state_directory_does_not_fail_a_committed_call(
    small_fs: Callable[..., SmallFs], engines: Callable[..., StorageEngine], tmp_path: Path
) -> None:
    """The read model is a cache: a call whose events are committed returns its id even when
    this host's state directory is full, and the view answers from memory."""
    fs = small_fs(16)
    se = engines(state_dir=os.path.join(fs.path, "state"), run_executors=False)
    repo = repository(se, str(tmp_path / "repo"))
    first = se.create_virtual_disk(repo, MiB)
    fs.fill(leave=0)
    made = [se.create_virtual_disk(repo, MiB, user_data={"pad": "z" * 4000}) for _ in range(200)]
    # The read model really could not be written meanwhile (else this test proves nothing).
    assert isinstance(se._repos[repo].view.persist_error, sqlite3.Error)
    assert {i.image_id for i in se.list_images(repo)} == {first, *made}
    assert log_ids(str(tmp_path / "repo")) == sorted({first, *made})
    fs.unfill()
    se.close()
    again = engines(state_dir=os.path.join(fs.path, "state"), run_executors=False)
    again.connect_storage_repository("r1", "localfs-1.0", {"path": str(tmp_path / "repo")})
    assert {i.image_id for i in again.list_images("r1")} == {first, *made}


def test_a_log_cut_behind_the_read_model_is_damage_and_nothing_is_cut(
    engines: Callable[..., StorageEngine], tmp_path: Path
) -> None:
    """Even with the hosts' witnesses gone, this host's read model remembers records that the
    log no longer holds: connecting says LogCorrupted and cuts nothing."""
    path = str(tmp_path / "repo")
    state = str(tmp_path / "state")
    se = engines(state_dir=state, run_executors=False)
    repo = repository(se, path)
    for _ in range(5):
        se.create_virtual_disk(repo, MiB)
    se.close()
    log_dir = os.path.join(path, "log")
    with OperationLog.open(log_dir, "auditor") as log:
        cut = log._offsets[log.last_seq - 2]  # the last two records go
    os.truncate(segment_path(log_dir, 1), cut)
    shutil.rmtree(os.path.join(log_dir, WITNESS_DIR))

    again = engines(state_dir=state, run_executors=False)
    with pytest.raises(LogCorrupted, match="read model"):
        again.connect_storage_repository("r1", "localfs-1.0", {"path": path})
    assert os.path.getsize(segment_path(log_dir, 1)) == cut


def test_a_log_removed_under_a_running_engine_is_noticed_at_the_next_call(
    engines: Callable[..., StorageEngine], tmp_path: Path
) -> None:
    path = str(tmp_path / "repo")
    se = engines(run_executors=False)
    repo = repository(se, path)
    disk = se.create_virtual_disk(repo, MiB)
    shutil.move(os.path.join(path, "log"), str(tmp_path / "saved-log"))
    with pytest.raises(LogMissing) as raised:
        se.create_virtual_disk(repo, MiB)
    assert raised.value.code == "log_missing"
    shutil.move(str(tmp_path / "saved-log"), os.path.join(path, "log"))
    assert log_ids(path) == [disk]


def test_wait_for_image_ends_when_another_thread_closes_or_disconnects(
    engines: Callable[..., StorageEngine], tmp_path: Path
) -> None:
    for how, expected in (("disconnect", RepositoryNotConnected), ("close", EngineClosed)):
        se = engines(run_executors=False)  # nothing will ever run the disk's stages
        repo = repository(se, str(tmp_path / f"repo-{how}"))
        disk = se.create_virtual_disk(repo, MiB)
        raised: list[BaseException] = []

        def wait(
            se: StorageEngine = se,
            repo: str = repo,
            disk: str = disk,
            raised: list[BaseException] = raised,
        ) -> None:
            try:
                se.wait_for_image(repo, disk)
            except BaseException as e:
                raised.append(e)

        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()
        if how == "disconnect":
            se.disconnect_storage_repository(repo)
        else:
            se.close()
        waiter.join(10)
        assert not waiter.is_alive(), f"wait_for_image still blocks after {how}"
        assert len(raised) == 1 and isinstance(raised[0], expected), raised


def test_calls_after_close_say_the_engine_is_closed(
    engines: Callable[..., StorageEngine], tmp_path: Path
) -> None:
    se = engines()
    repo = repository(se, str(tmp_path / "repo"))
    se.close()
    os.mkdir(tmp_path / "other")
    calls: list[Callable[[], object]] = [
        lambda: se.list_images(repo),
        lambda: se.create_virtual_disk(repo, MiB),
        lambda: se.create_storage_repository("localfs-1.0", {"path": str(tmp_path / "other")}),
        lambda: se.connect_storage_repository("r2", "localfs-1.0", {"path": str(tmp_path)}),
        lambda: se.lookup_image_by_path(str(tmp_path / "x")),
    ]
    for call in calls:
        with pytest.raises(EngineClosed) as raised:
            call()
        assert raised.value.code == "engine_closed"
    assert os.listdir(tmp_path / "other") == []


def test_a_state_dir_that_is_a_file_is_a_clear_error(
    engines: Callable[..., StorageEngine], tmp_path: Path
) -> None:
    (tmp_path / "state-file").write_text("not a directory")
    se = engines(state_dir=str(tmp_path / "state-file"))
    os.mkdir(tmp_path / "repo")
    se.create_storage_repository("localfs-1.0", {"path": str(tmp_path / "repo")})
    with pytest.raises(InvalidParameter, match="not a directory"):
        se.connect_storage_repository("r1", "localfs-1.0", {"path": str(tmp_path / "repo")})


def test_a_create_whose_commit_is_unknown_is_safe_to_retry(
    engines: Callable[..., StorageEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync fails and nothing can undo or confirm the write: the call says CommitUnknown.
    Retried with the same arguments once the storage works, it gives the image the first
    attempt made, and the repository holds it once."""
    path = str(tmp_path / "repo")
    se = engines(run_executors=False)
    repo = repository(se, path)

    for name in ("engine.log.store.os.fdatasync", "engine.log.store.os.fsync"):
        monkeypatch.setattr(name, eio)
    monkeypatch.setattr("engine.log.space.os.ftruncate", eio)
    with pytest.raises(CommitUnknown) as raised:
        se.create_virtual_disk(repo, MiB, user_data={"name": "web01"})
    assert raised.value.code == "commit_unknown"
    monkeypatch.undo()
    disk = se.create_virtual_disk(repo, MiB, user_data={"name": "web01"})
    assert log_ids(path) == [disk]
    other = se.create_virtual_disk(repo, MiB, user_data={"name": "web01"})  # a new call
    assert log_ids(path) == sorted([disk, other])
