"""check_storage_repository and fix_storage_repository: space comes back, chains get shorter,
broken images are mended, stale fixes are refused, and the engine replays from the log alone."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import StaleFix
from engine.formats.qemu.image_tools import QemuImg
from tests.facade.images import MiB, holds, run_fixes, write


def volume_files(path: str) -> set[str]:
    return {n for n in os.listdir(os.path.join(path, "volumes")) if not n.startswith(".")}


def settle(engine: StorageEngine, repo: str, kind: str, *, rounds: int = 10) -> None:
    """Run the fixes of one kind until check offers none (a fix may enable the next)."""
    for _ in range(rounds):
        if run_fixes(engine, repo, kind) == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{kind} fixes kept coming")


def test_removing_a_disk_frees_its_volume_through_a_clean_fix(
    engine: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    assert len(volume_files(repo_paths[0])) == 1
    engine.remove_image("r1", disk)
    cleans = [f for f in engine.check_storage_repository("r1") if f.type == "clean"]
    assert cleans, "a removed disk's volume must be offered to clean"
    settle(engine, "r1", "clean")
    deadline = time.monotonic() + 20
    while volume_files(repo_paths[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert volume_files(repo_paths[0]) == set()
    assert engine.check_storage_repository("r1") == []


def test_a_removed_snapshot_is_merged_into_the_disks_that_need_it(
    engine: StorageEngine, qemu: QemuImg, repo_paths: tuple[str, str]
) -> None:
    disk = engine.create_virtual_disk("r1", 16 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 0, 2 * MiB, 0x21)
    snap = engine.create_snapshot("r1", disk)
    clone = engine.create_virtual_disk("r1", 16 * MiB, base_snapshot_id=snap)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.wait_for_image("r1", clone, timeout=30)
    write(engine, qemu, "r1", disk, MiB, MiB, 0x22)
    engine.remove_image("r1", snap)
    merges = [f for f in engine.check_storage_repository("r1") if f.type == "merge"]
    assert merges and snap in {i for f in merges for i in f.image_ids}
    settle(engine, "r1", "merge")
    settle(engine, "r1", "clean")
    assert engine.get_image_info("r1", disk).chain_depth == 1
    assert engine.get_image_info("r1", clone).chain_depth == 1
    assert holds(engine, qemu, "r1", disk, 0, MiB, 0x21)
    assert holds(engine, qemu, "r1", disk, MiB, MiB, 0x22)
    assert holds(engine, qemu, "r1", clone, 0, 2 * MiB, 0x21)
    assert engine.get_image_status("r1", disk).status == "optimized"
    assert len(volume_files(repo_paths[0])) == 2  # one per disk, the snapshot's is gone


def test_a_fix_that_no_longer_applies_is_refused(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB, options={"auto_fix": False})
    (mend,) = [f for f in engine.check_storage_repository("r1") if f.type == "mend"]
    engine.remove_image("r1", disk)
    with pytest.raises(StaleFix) as caught:
        engine.fix_storage_repository("r1", mend)
    assert caught.value.code == "stale_fix"


def test_a_leftover_file_is_offered_to_clean(
    engine: StorageEngine, repo_paths: tuple[str, str], qemu: QemuImg
) -> None:
    stray = os.path.join(repo_paths[0], "volumes", "ab" * 16 + ".qcow2")
    qemu.create(stray, "qcow2", MiB)
    assert any(f.type == "clean" for f in engine.check_storage_repository("r1"))
    settle(engine, "r1", "clean")
    deadline = time.monotonic() + 20
    while os.path.exists(stray) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(stray)


def test_a_missing_volume_makes_its_image_broken(
    engine: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    for name in volume_files(repo_paths[0]):
        os.unlink(os.path.join(repo_paths[0], "volumes", name))
    engine.check_storage_repository("r1")
    assert engine.get_image_status("r1", disk).status == "broken"


def test_stop_fix_stops_the_work_and_says_so(tmp_path: Path, repo_paths: tuple[str, str]) -> None:
    with StorageEngine("host-b", state_dir=str(tmp_path / "s"), run_executors=False) as se:
        se.create_storage_repository("localfs-1.0", {"path": repo_paths[0]})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.stop_fix("r1", disk, reason="host overloaded")
        status = se.get_image_status("r1", disk)
        assert status.status == "broken"
        assert status.last_error is not None and "host overloaded" in status.last_error
        (mend,) = [f for f in se.check_storage_repository("r1") if f.type == "mend"]
        assert mend.image_ids == (disk,)
    with StorageEngine("host-b", state_dir=str(tmp_path / "s"), poll_interval=0.1) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        se.fix_storage_repository("r1", mend)
        assert se.wait_for_image("r1", disk, timeout=30).status == "optimized"


def test_statuses_replay_from_the_log_alone(tmp_path: Path, repo_paths: tuple[str, str]) -> None:
    def statuses(se: StorageEngine) -> dict[str, tuple[str, str, int]]:
        return {
            i.image_id: (lambda s: (s.status, s.stage, s.percent_complete))(
                se.get_image_status("r1", i.image_id)
            )
            for i in se.list_images("r1")
        }

    with StorageEngine("host-a", state_dir=str(tmp_path / "a"), poll_interval=0.1) as se:
        se.create_storage_repository("localfs-1.0", {"path": repo_paths[0]})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        snap = se.create_snapshot("r1", disk)
        se.create_virtual_disk("r1", 8 * MiB, base_snapshot_id=snap, options={"auto_fix": False})
        se.wait_for_image("r1", disk, timeout=30)
        se.wait_for_image("r1", snap, timeout=30)  # its digest (docs/adr/0031)
        before = statuses(se)
    for state_dir in (tmp_path / "a", tmp_path / "empty"):  # warm, then rebuilt from scratch
        with StorageEngine("host-a", state_dir=str(state_dir), run_executors=False) as se:
            se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
            assert statuses(se) == before


def test_a_snapshot_of_a_disk_removed_before_its_work_ran_is_still_made(
    tmp_path: Path, repo_paths: tuple[str, str]
) -> None:
    with StorageEngine("host-c", state_dir=str(tmp_path / "c"), run_executors=False) as se:
        se.create_storage_repository("localfs-1.0", {"path": repo_paths[0]})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        disk = se.create_virtual_disk("r1", 8 * MiB)
        snap = se.create_snapshot("r1", disk)
        se.remove_image("r1", disk)  # before any executor made the disk's volume
    with StorageEngine("host-c", state_dir=str(tmp_path / "c"), poll_interval=0.1) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        assert se.wait_for_image("r1", snap, timeout=30).status == "optimized"
        settle(se, "r1", "clean")
        assert se.get_image_info("r1", snap).chain_depth == 1
        assert se.check_storage_repository("r1") == []
