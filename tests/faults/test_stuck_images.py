"""Nothing is stuck without a reason (architecture §6): work whose input was removed meanwhile still
finishes, and an image whose volume went missing or was damaged says so and gets a fix."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import ImageNotFound
from engine.formats.qemu.image_tools import QemuImg
from tests.facade.images import MiB, holds, prepared, run_fixes, write

REPOS = ("r1", "r2")


@pytest.fixture
def paths(repo_paths: tuple[str, str]) -> tuple[str, str]:
    return repo_paths


@contextlib.contextmanager
def host(
    tmp_path: Path, paths: tuple[str, str], name: str, *, executors: bool = True
) -> Iterator[StorageEngine]:
    state = str(tmp_path / f"state-{name}")
    with StorageEngine(name, state_dir=state, run_executors=executors, poll_interval=0.1) as se:
        for repo, path in zip(REPOS, paths, strict=True):
            if not os.path.exists(os.path.join(path, "volumes")):
                se.create_storage_repository("localfs-1.0", {"path": path})
            se.connect_storage_repository(repo, "localfs-1.0", {"path": path})
        yield se


def volume_files(path: str) -> set[str]:
    return set(os.listdir(os.path.join(path, "volumes")))


def export(engine: StorageEngine, qemu: QemuImg, repo: str, image: str, to: str) -> None:
    """What the image holds now, as a raw file outside any repository."""
    with prepared(engine, repo, image) as p:
        qemu.convert(p.path, to, src_fmt=p.format, dst_fmt="raw")


def matches(engine: StorageEngine, qemu: QemuImg, repo: str, image: str, raw: str) -> bool:
    with prepared(engine, repo, image) as p:
        return qemu.compare(p.path, raw, a_fmt=p.format, b_fmt="raw")


def cleaned(engine: StorageEngine, repo: str, path: str, gone: set[str]) -> bool:
    """Run clean fixes until the files ``gone`` are no longer there."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run_fixes(engine, repo, "clean")
        if not gone & volume_files(path):
            return True
        time.sleep(0.2)
    return False


# --- an operation whose input was removed still finishes ---------------------------------------


def test_a_copy_of_an_image_removed_before_the_copy_ran_still_finishes(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    expected = str(tmp_path / "expected.raw")
    with host(tmp_path, paths, "host-a") as se:
        src = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", src, timeout=30)
        write(se, qemu, "r1", src, 0, MiB, 0x5A)
        export(se, qemu, "r1", src, expected)
        src_files = volume_files(paths[0])
    with host(tmp_path, paths, "host-b", executors=False) as se:
        copy = se.copy_image("r2", src)
        se.remove_image("r1", src)
        # A check meanwhile offers nothing that the pending copy still reads.
        for fix in se.check_storage_repository("r1"):
            assert fix.type != "clean", fix.description
    with host(tmp_path, paths, "host-a") as se:
        assert se.wait_for_image("r2", copy, timeout=30).status == "optimized"
        assert matches(se, qemu, "r2", copy, expected)
        assert cleaned(se, "r1", paths[0], src_files)


def test_a_copy_of_a_snapshot_keeps_its_id_and_still_finishes_once_the_source_is_removed(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    """The copy holds the snapshot's own id (architecture §1): the removed source, whole, is read,
    not the copy that is still to be made."""
    with host(tmp_path, paths, "host-a") as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        write(se, qemu, "r1", disk, 0, MiB, 0x3C)
        snap = se.create_snapshot("r1", disk)
        se.wait_for_image("r1", snap, timeout=30)
    with host(tmp_path, paths, "host-b", executors=False) as se:
        assert se.copy_image("r2", snap) == snap
        se.remove_image("r1", snap)
    with host(tmp_path, paths, "host-a") as se:
        assert se.wait_for_image("r2", snap, timeout=30).status == "optimized"
        assert holds(se, qemu, "r2", snap, 0, MiB, 0x3C)


def test_a_snapshot_and_a_clone_of_removed_images_are_still_made(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    with host(tmp_path, paths, "host-a") as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        write(se, qemu, "r1", disk, 0, MiB, 0x11)
    with host(tmp_path, paths, "host-b", executors=False) as se:
        snap = se.create_snapshot("r1", disk)
        se.remove_image("r1", disk)
        clone = se.create_virtual_disk("r1", 8 * MiB, base_snapshot_id=snap)
        se.remove_image("r1", snap)
        for fix in se.check_storage_repository("r1"):
            assert fix.type != "clean", fix.description
    with host(tmp_path, paths, "host-a") as se:
        assert se.wait_for_image("r1", clone, timeout=30).status == "optimized"
        assert holds(se, qemu, "r1", clone, 0, MiB, 0x11)
        for kind in ("merge", "clean"):
            run_fixes(se, "r1", kind)
        assert holds(se, qemu, "r1", clone, 0, MiB, 0x11)


def test_a_chain_of_work_on_removed_images_all_finishes(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    """A snapshot of a disk, a clone of that snapshot, a copy of the clone: the middle ones
    removed before anything ran. The copy reads what the removed ones were to make."""
    with host(tmp_path, paths, "host-b", executors=False) as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        snap = se.create_snapshot("r1", disk)
        clone = se.create_virtual_disk("r1", 8 * MiB, base_snapshot_id=snap)
        local_copy = se.copy_image("r1", clone)
        remote_copy = se.copy_image("r2", clone)
        se.remove_image("r1", snap)
        se.remove_image("r1", clone)
        for repo in REPOS:
            for fix in se.check_storage_repository(repo):
                assert fix.type != "clean", fix.description
    with host(tmp_path, paths, "host-a") as se:
        for repo, image in (("r1", disk), ("r1", local_copy), ("r2", remote_copy)):
            assert se.wait_for_image(repo, image, timeout=30).status == "optimized"
        assert holds(se, qemu, "r2", remote_copy, 0, MiB, 0)
        for kind in ("merge", "clean", "merge", "clean"):
            run_fixes(se, "r1", kind)
        assert se.get_image_status("r1", local_copy).status == "optimized"
        assert se.get_image_status("r1", disk).status == "optimized"


def test_a_copy_whose_removed_source_was_cleaned_fails_with_a_reason(
    tmp_path: Path, paths: tuple[str, str]
) -> None:
    """A clean run on a host that cannot see the copy's repository frees the source: the copy
    then cannot finish, and says why instead of waiting for ever."""
    with host(tmp_path, paths, "host-a") as se:
        src = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", src, timeout=30)
    with host(tmp_path, paths, "host-b", executors=False) as se:
        copy = se.copy_image("r2", src)
        se.remove_image("r1", src)
    for name in volume_files(paths[0]):
        os.unlink(os.path.join(paths[0], "volumes", name))
    with host(tmp_path, paths, "host-a") as se:
        status = se.wait_for_image("r2", copy, timeout=30)
        assert status.status == "broken"
        assert status.last_error
        assert [f.type for f in se.check_storage_repository("r2")] == ["mend"]


# --- missing and damaged volumes ----------------------------------------------------------------


def test_a_deleted_volume_makes_the_image_broken_with_a_reason_and_a_fix(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    with host(tmp_path, paths, "host-a") as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        (name,) = volume_files(paths[0])
        os.unlink(os.path.join(paths[0], "volumes", name))
        status = se.get_image_status("r1", disk)  # no check needed first
        assert status.status == "broken"
        assert status.last_error is not None and name in status.last_error
        (fix,) = se.check_storage_repository("r1")
        assert fix.type == "mend" and fix.image_ids == (disk,)
        assert "lost" in fix.description
        se.fix_storage_repository("r1", fix)
        with pytest.raises(ImageNotFound):
            se.get_image_status("r1", disk)
        assert se.check_storage_repository("r1") == []


def test_a_deleted_top_overlay_is_recreated_and_says_the_writes_are_lost(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    with host(tmp_path, paths, "host-a") as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        write(se, qemu, "r1", disk, 0, MiB, 0x22)
        se.create_snapshot("r1", disk)
        se.wait_for_image("r1", disk, timeout=30)
        write(se, qemu, "r1", disk, MiB, MiB, 0x33)
        with prepared(se, "r1", disk) as p:
            top = p.path
        os.unlink(top)
        status = se.get_image_status("r1", disk)
        assert status.status == "broken" and os.path.basename(top) in str(status.last_error)
        mends = [f for f in se.check_storage_repository("r1") if f.type == "mend"]
        recreate = [f for f in mends if "recreate" in f.description]
        assert len(recreate) == 1 and "lost" in recreate[0].description
        se.fix_storage_repository("r1", recreate[0])
        status = se.wait_for_image("r1", disk, timeout=30)
        assert status.status == "optimized", status
        assert holds(se, qemu, "r1", disk, 0, MiB, 0x22)
        assert holds(se, qemu, "r1", disk, MiB, MiB, 0)


def test_a_lost_copy_of_a_snapshot_is_copied_again(
    tmp_path: Path, paths: tuple[str, str], qemu: QemuImg
) -> None:
    with host(tmp_path, paths, "host-a") as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        write(se, qemu, "r1", disk, 0, MiB, 0x44)
        snap = se.create_snapshot("r1", disk)
        se.wait_for_image("r1", snap, timeout=30)
        copy = se.copy_image("r1", snap)
        se.wait_for_image("r1", copy, timeout=30)
        with prepared(se, "r1", copy) as p:
            path = p.path
        with open(path, "r+b") as f:  # garbage over the header and the first tables
            f.write(os.urandom(64 * 1024))
        assert se.get_image_status("r1", copy).status == "optimized"  # not seen yet
        fixes = se.check_storage_repository("r1")
        status = se.get_image_status("r1", copy)
        assert status.status == "broken" and os.path.basename(path) in str(status.last_error)
        (mend,) = [f for f in fixes if f.type == "mend"]
        assert mend.image_ids[0] == copy and "copy it again" in mend.description
        se.fix_storage_repository("r1", mend)
        assert se.wait_for_image("r1", copy, timeout=30).status == "optimized"
        assert holds(se, qemu, "r1", copy, 0, MiB, 0x44)
        assert [f.type for f in se.check_storage_repository("r1")] == []


def test_a_qcow2_volume_overwritten_with_garbage_is_found_by_the_check(
    tmp_path: Path, paths: tuple[str, str]
) -> None:
    with host(tmp_path, paths, "host-a") as se:
        disk = se.create_virtual_disk("r1", 8 * MiB)
        raw = se.create_virtual_disk("r1", 8 * MiB, options={"strategy": "performance"})
        for image in (disk, raw):
            se.wait_for_image("r1", image, timeout=30)
        assert se.check_storage_repository("r1") == []  # sound: its header is not read again...
        with prepared(se, "r1", disk) as p, open(p.path, "r+b") as f:
            f.write(os.urandom(64 * 1024))  # ...unless the file was written since
        with prepared(se, "r1", raw) as p:
            os.truncate(p.path, MiB)
        fixes = se.check_storage_repository("r1")
        for image in (disk, raw):
            status = se.get_image_status("r1", image)
            assert status.status == "broken" and "damaged" in str(status.last_error)
        assert sorted(f.image_ids for f in fixes if f.type == "mend") == sorted([(disk,), (raw,)])
