"""Seed 000's image operations end to end, on real raw and qcow2 files made by qemu-img."""

from __future__ import annotations

import os

import pytest

from engine import StorageEngine
from engine.errors import ImageInUse, ImageNotFound, ImageNotReady, WrongImageKind
from engine.formats.qemu.image_tools import QemuImg, allocated_bytes
from tests.facade.images import MiB, holds, same_content, write


def test_a_blank_disk_is_a_thin_qcow2_volume_and_optimized(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 64 * MiB, user_data={"name": "web01"})
    status = engine.wait_for_image("r1", disk, timeout=30)
    assert status.status == "optimized"
    assert (status.stage, status.percent_complete, status.host_id) == ("1/1", 100, "host-a")
    prepared = engine.prepare_image("r1", disk)
    engine.teardown_image("r1", disk)
    assert prepared.format == "qcow2" and not prepared.readonly
    assert allocated_bytes(prepared.path) < 2 * MiB
    info = engine.get_image_info("r1", disk)
    assert (info.kind, info.size, info.user_data, info.chain_depth) == (
        "virtual-disk", 64 * MiB, {"name": "web01"}, 1,
    )  # fmt: skip


def test_a_performance_disk_is_one_preallocated_raw_volume(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB, options={"strategy": "performance"})
    assert engine.wait_for_image("r1", disk, timeout=30).status == "optimized"
    prepared = engine.prepare_image("r1", disk)
    engine.teardown_image("r1", disk)
    assert prepared.format == "raw"
    assert allocated_bytes(prepared.path) >= 8 * MiB


def test_a_snapshot_keeps_its_content_while_the_disk_is_written(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk = engine.create_virtual_disk("r1", 16 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 0, MiB, 0xAA)
    snap = engine.create_snapshot("r1", disk, user_data={"label": "before"})
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 0, MiB, 0xBB)
    assert holds(engine, qemu, "r1", snap, 0, MiB, 0xAA)
    assert holds(engine, qemu, "r1", disk, 0, MiB, 0xBB)
    snap_prepared = engine.prepare_image("r1", snap)
    engine.teardown_image("r1", snap)
    assert snap_prepared.readonly
    assert engine.get_image_status("r1", snap).status == "optimized"
    assert engine.get_image_info("r1", disk).chain_depth == 2


def test_a_disk_created_and_snapshotted_at_once_both_succeed(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    snap = engine.create_snapshot("r1", disk)
    assert engine.wait_for_image("r1", disk, timeout=30).status == "optimized"
    assert engine.wait_for_image("r1", snap, timeout=30).status == "optimized"


def test_disks_from_a_snapshot_start_with_its_content(engine: StorageEngine, qemu: QemuImg) -> None:
    base = engine.create_virtual_disk("r1", 16 * MiB)
    engine.wait_for_image("r1", base, timeout=30)
    write(engine, qemu, "r1", base, 4 * MiB, 2 * MiB, 0x5A)
    snap = engine.create_snapshot("r1", base)
    thin = engine.create_virtual_disk("r1", 16 * MiB, base_snapshot_id=snap)
    fast = engine.create_virtual_disk(
        "r1", 16 * MiB, base_snapshot_id=snap, options={"strategy": "performance"}
    )
    assert engine.wait_for_image("r1", thin, timeout=30).status == "optimized"
    assert engine.wait_for_image("r1", fast, timeout=30).status == "optimized"
    assert same_content(engine, qemu, ("r1", thin), ("r1", snap))
    assert same_content(engine, qemu, ("r1", fast), ("r1", snap))
    assert engine.get_image_info("r1", thin).chain_depth == 2
    assert engine.get_image_info("r1", fast).chain_depth == 1
    assert engine.prepare_image("r1", fast).format == "raw"
    engine.teardown_image("r1", fast)


def test_a_disk_on_a_snapshot_of_another_repository_gets_a_local_copy_of_it(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    base = engine.create_virtual_disk("r1", 8 * MiB)
    engine.wait_for_image("r1", base, timeout=30)
    write(engine, qemu, "r1", base, 0, MiB, 0x11)
    snap = engine.create_snapshot("r1", base)
    clone = engine.create_virtual_disk("r2", 8 * MiB, base_snapshot_id=snap)
    assert engine.wait_for_image("r2", clone, timeout=30).status == "optimized"
    assert engine.get_image_info("r2", snap).kind == "snapshot"  # same id, in r2 now
    assert same_content(engine, qemu, ("r2", clone), ("r1", snap))


def test_a_copy_to_another_repository_is_byte_identical(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk = engine.create_virtual_disk("r1", 32 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 3 * MiB, 5 * MiB, 0xC3)
    copy = engine.copy_image("r2", disk)
    assert copy != disk
    assert engine.wait_for_image("r2", copy, timeout=30).status == "optimized"
    assert same_content(engine, qemu, ("r2", copy), ("r1", disk))
    assert engine.get_image_info("r2", copy).kind == "virtual-disk"


def test_a_copied_snapshot_keeps_its_id(engine: StorageEngine, qemu: QemuImg) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    snap = engine.create_snapshot("r1", disk)
    copy = engine.copy_image("r2", snap)
    assert copy == snap
    assert engine.wait_for_image("r2", copy, timeout=30).status == "optimized"
    assert engine.copy_image("r2", snap) == snap  # already there: nothing more to do


def test_seed_001_incremental_backup_holds_only_the_difference(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    image_a = engine.create_virtual_disk("r1", 64 * MiB)
    engine.wait_for_image("r1", image_a, timeout=30)
    write(engine, qemu, "r1", image_a, 0, 32 * MiB, 0x01)  # 1-3: run, write, stop
    copy1 = engine.copy_image("r2", image_a)  # 4: copy to repoB
    engine.wait_for_image("r2", copy1, timeout=30)
    write(engine, qemu, "r1", image_a, 8 * MiB, MiB, 0x02)  # 5-7: run again, write, stop
    copy2 = engine.copy_image("r2", image_a, base_image_id=copy1)  # 8: only the diff
    assert engine.wait_for_image("r2", copy2, timeout=30).status == "optimized"
    assert same_content(engine, qemu, ("r2", copy2), ("r1", image_a))
    diff = engine.prepare_image("r2", copy2)
    engine.teardown_image("r2", copy2)
    assert allocated_bytes(diff.path) < 2 * MiB + 512 * 1024
    assert engine.get_image_info("r2", copy2).chain_depth >= 2
    # The base stays usable and unchanged.
    assert same_content(engine, qemu, ("r2", copy1), ("r1", image_a)) is False
    assert holds(engine, qemu, "r2", copy1, 8 * MiB, MiB, 0x01)


def test_a_removed_image_is_gone_for_users_at_once(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    engine.remove_image("r1", disk)
    with pytest.raises(ImageNotFound) as caught:
        engine.get_image_status("r1", disk)
    assert caught.value.code == "image_not_found"
    assert disk not in [i.image_id for i in engine.list_images("r1")]


def test_wrong_kinds_and_images_in_use_are_refused(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    snap = engine.create_snapshot("r1", disk)
    with pytest.raises(WrongImageKind):
        engine.create_snapshot("r1", snap)
    with pytest.raises(WrongImageKind):
        engine.create_virtual_disk("r1", 8 * MiB, base_snapshot_id=disk)
    with pytest.raises(WrongImageKind):
        engine.resize_virtual_disk("r1", snap, 16 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.prepare_image("r1", disk)
    with pytest.raises(ImageInUse):
        engine.create_snapshot("r1", disk)
    with pytest.raises(ImageInUse):
        engine.remove_image("r1", disk)
    engine.teardown_image("r1", disk)
    engine.create_snapshot("r1", disk)


def test_an_image_with_work_held_is_broken_until_a_fix_runs(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB, options={"auto_fix": False})
    status = engine.wait_for_image("r1", disk, timeout=30)
    assert status.status == "broken"
    with pytest.raises(ImageNotReady):
        engine.prepare_image("r1", disk)
    mends = [f for f in engine.check_storage_repository("r1") if f.type == "mend"]
    assert [f.image_ids for f in mends] == [(disk,)]
    engine.fix_storage_repository("r1", mends[0])
    engine.fix_storage_repository("r1", mends[0])  # twice is safe
    assert engine.wait_for_image("r1", disk, timeout=30).status == "optimized"


def test_user_data_resize_lookup_and_describe(engine: StorageEngine) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB, user_data={"v": 1})
    engine.set_user_data("r1", disk, {"v": 2, "tags": ["a", "b"]})
    assert engine.get_image_info("r1", disk).user_data == {"v": 2, "tags": ["a", "b"]}
    engine.resize_virtual_disk("r1", disk, 16 * MiB)
    assert engine.wait_for_image("r1", disk, timeout=30).status == "optimized"
    prepared = engine.prepare_image("r1", disk)
    assert engine.lookup_image_by_path(prepared.path).image_id == disk
    engine.teardown_image("r1", disk)
    assert engine.get_image_info("r1", disk).size == 16 * MiB
    info = QemuImg().info(prepared.path)
    assert isinstance(info, dict) and info["virtual-size"] == 16 * MiB
    description = engine.describe_repository("r1")
    assert description["images"] == 1 and description["virtual_disks"] == 1
    assert os.path.isdir(description["path"])
