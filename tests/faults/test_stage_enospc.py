"""A data stage that runs out of space (issue 11, item 11): it fails saying the storage is
full, the check offers to clean what the failed attempt left as well as to mend it, and once
space is freed the mend completes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg
from tests.facade.images import MiB, holds, write
from tests.faults.smallfs import SmallFs


def temporaries(repo: str) -> list[str]:
    return [n for n in os.listdir(os.path.join(repo, "volumes")) if n.startswith(".tmp-")]


def test_a_copy_that_fills_the_storage_fails_and_is_cleaned_and_mended(
    tmp_path: Path, small_fs: Callable[..., SmallFs]
) -> None:
    qemu = QemuImg()
    fs = small_fs(64)
    repo = os.path.join(fs.path, "repo")
    os.mkdir(repo)
    with StorageEngine("host-a", state_dir=str(tmp_path / "state"), poll_interval=0.1) as se:
        se.create_storage_repository("localfs-1.0", {"path": repo})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
        disk = se.create_virtual_disk("r1", 32 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        write(se, qemu, "r1", disk, 0, 16 * MiB, 0x6B)
        fs.fill(leave=4 * MiB)  # room for the log's appends, not for the copy's data

        copy = se.copy_image("r1", disk)
        status = se.wait_for_image("r1", copy, timeout=60)
        assert status.status == "broken"
        assert status.last_error is not None and "filesystem is full" in status.last_error
        assert temporaries(repo), "the failed attempt's file is still there"

        fixes = se.check_storage_repository("r1")
        assert sorted(f.type for f in fixes) == ["clean", "mend"]
        (clean,) = [f for f in fixes if f.type == "clean"]
        assert "temporary" in clean.description
        se.fix_storage_repository("r1", clean)
        deadline = time.monotonic() + 30
        while temporaries(repo) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert temporaries(repo) == []

        fs.unfill()
        (mend,) = [f for f in se.check_storage_repository("r1") if f.type == "mend"]
        se.fix_storage_repository("r1", mend)
        assert se.wait_for_image("r1", copy, timeout=60).status == "optimized"
        assert holds(se, qemu, "r1", copy, 0, 16 * MiB, 0x6B)
        assert temporaries(repo) == []
        assert se.check_storage_repository("r1") == []


def test_a_clone_waiting_on_a_removed_disk_whose_work_failed_says_so_and_is_mended(
    tmp_path: Path, small_fs: Callable[..., SmallFs]
) -> None:
    """The disk and its snapshot are removed before anything ran; the clone still needs the
    disk's first volume, whose stage then runs out of space. The clone says what it waits for,
    wait_for_image returns, and the check offers to mend the removed disk's work."""
    fs = small_fs(64)
    repo = os.path.join(fs.path, "repo")
    os.mkdir(repo)
    params = {"path": repo}
    with StorageEngine("host-b", state_dir=str(tmp_path / "b"), run_executors=False) as se:
        se.create_storage_repository("localfs-1.0", params)
        se.connect_storage_repository("r1", "localfs-1.0", params)
        disk = se.create_virtual_disk("r1", 32 * MiB, options={"strategy": "performance"})
        snap = se.create_snapshot("r1", disk)
        clone = se.create_virtual_disk("r1", 32 * MiB, base_snapshot_id=snap)
        se.remove_image("r1", disk)
        se.remove_image("r1", snap)
    fs.fill(leave=4 * MiB)  # no room for the disk's 32 MiB preallocated volume
    with StorageEngine("host-a", state_dir=str(tmp_path / "a"), poll_interval=0.1) as se:
        se.connect_storage_repository("r1", "localfs-1.0", params)
        status = se.wait_for_image("r1", clone, timeout=60)
        assert status.status == "broken"
        assert status.last_error is not None and "filesystem is full" in status.last_error
        assert disk in status.last_error
        mends = [f for f in se.check_storage_repository("r1") if f.type == "mend"]
        assert [f.image_ids for f in mends] == [(disk,)]
        fs.unfill()
        se.fix_storage_repository("r1", mends[0])
        assert se.wait_for_image("r1", clone, timeout=60).status == "optimized"
