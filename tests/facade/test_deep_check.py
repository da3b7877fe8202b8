"""``check_storage_repository(repo, {"deep": True})`` through a real engine (docs/adr/0033):
it reads every volume, and what it finds damaged breaks the images that read it, with a
``last_error`` naming the volume, and a mend on offer."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import StorageEngine
from engine.errors import DeepCheckUnfinished, InvalidParameter, StrataError
from engine.formats.qemu import digests
from engine.formats.qemu.image_tools import QemuImg
from engine.types import Volume
from log_tools.export import events
from tests.digest_records import record_file_digest
from tests.facade.images import MiB, tree_digest, write

qemu = QemuImg()


def chain_of(engine: StorageEngine, repo: str, image: str) -> list[Volume]:
    return engine.get_volume_chain(repo, image)


def damage_in_log(repo_path: str) -> list[dict[str, object]]:
    """The DamageFound events of the repository's log, with the image each is on."""
    return [
        {"image": e["aggregate_id"], **json.loads(e["fields"])}
        for e in events(os.path.join(repo_path, "log"), 2**62)
        if e["event"] == "DamageFound"
    ]


def corrupt_l2(path: str) -> None:
    """Point the volume's first data cluster past the end of its file."""
    with open(path, "r+b") as f:
        header = f.read(48)
        (l1_offset,) = struct.unpack(">Q", header[40:48])
        f.seek(l1_offset)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(entry & 0x00FFFFFFFFFFFE00)
        f.write(struct.pack(">Q", (1 << 63) | 0x7F0000000))


def disk_with_snapshot(engine: StorageEngine) -> tuple[str, str]:
    disk = engine.create_virtual_disk("r1", 16 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 0, 4 * MiB, 0x33)
    snapshot = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.wait_for_image("r1", snapshot, timeout=30)  # its digest
    write(engine, qemu, "r1", disk, 8 * MiB, 2 * MiB, 0x44)
    return disk, snapshot


def test_a_clean_repository_is_found_sound_with_no_fix(engine: StorageEngine) -> None:
    disk, snapshot = disk_with_snapshot(engine)

    fixes = engine.check_storage_repository("r1", {"deep": True})

    assert [f for f in fixes if f.type == "mend"] == []
    assert engine.get_image_status("r1", disk).status == "optimized"
    assert engine.get_image_status("r1", snapshot).status == "optimized"
    assert engine.describe_repository("r1")["deep_check"] is None


def test_a_corrupt_qcow2_volume_breaks_the_disk_that_reads_it_and_a_mend_is_offered(
    engine: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    disk, snapshot = disk_with_snapshot(engine)
    top = chain_of(engine, "r1", disk)[-1]
    assert top.format == "qcow2"
    corrupt_l2(top.path)

    fixes = engine.check_storage_repository("r1", {"deep": True})

    status = engine.get_image_status("r1", disk)
    assert status.status == "broken"
    assert status.last_error is not None
    assert status.last_error.startswith(f"volume {top.volume_id}.qcow2 is damaged: qemu-img check")
    assert "found by the deep check of" in status.last_error
    assert engine.get_image_status("r1", snapshot).status == "optimized"  # reads only its base
    [mend] = [f for f in fixes if f.type == "mend"]
    assert mend.image_ids == (disk,)
    [found] = damage_in_log(repo_paths[0])
    assert found["image"] == disk  # the owner: the image whose top it is
    assert found["volume"] == f"{top.volume_id}.qcow2"
    assert found["ranges"] == []

    engine.fix_storage_repository("r1", mend)  # the disk's top made again, empty
    engine.wait_for_image("r1", disk, timeout=30)

    assert engine.get_image_status("r1", disk).status == "optimized"
    assert [f for f in engine.check_storage_repository("r1") if f.type == "mend"] == []


def test_the_damage_is_in_the_log_so_another_host_says_so_too(
    engine: StorageEngine, repo_paths: tuple[str, str], tmp_path: Path
) -> None:
    disk, _ = disk_with_snapshot(engine)
    corrupt_l2(chain_of(engine, "r1", disk)[-1].path)
    engine.check_storage_repository("r1", {"deep": True})

    with StorageEngine("host-b", state_dir=f"{tmp_path}/state-b", run_executors=False) as other:
        other.connect_storage_repository("r1", "localfs-1.0", {"path": repo_paths[0]})
        status = other.get_image_status("r1", disk)

    assert status.status == "broken"
    assert status.last_error == engine.get_image_status("r1", disk).last_error


@pytest.mark.parametrize(
    "options",
    [{"deep": "yes"}, {"deep": 1}, {"depth": True}, {"deep": True, "fast": False}, ["deep"]],
    ids=str,
)
def test_bad_options_are_refused_and_nothing_is_written(
    engine: StorageEngine, repo_paths: tuple[str, str], options: object
) -> None:
    disk_with_snapshot(engine)
    before = tree_digest(*repo_paths)

    with pytest.raises(InvalidParameter) as refused:
        engine.check_storage_repository("r1", options)  # type: ignore[arg-type]

    assert refused.value.name == "options"
    assert tree_digest(*repo_paths) == before


def test_without_deep_no_operation_is_queued(
    engine: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    disk_with_snapshot(engine)
    before = tree_digest(*repo_paths)

    engine.check_storage_repository("r1", {"deep": False})
    engine.check_storage_repository("r1", {})

    assert tree_digest(*repo_paths) == before


# --- content against recorded digests ---------------------------------------------------------


def record_digest(engine: StorageEngine, repo: str, image: str) -> str:
    """Record the digest of the image's top volume, as a snapshot's digest stage does
    (docs/adr/0031); returns the volume. Through the repository's own command service."""
    connected = engine._repos[repo]
    image_id = uuid.UUID(image)
    ref = connected.view.image(image_id).chain[-1]  # type: ignore[union-attr]
    volume_id, fmt = ref.split(".")
    path = connected.storage.volume_path(volume_id, fmt)
    record_file_digest(connected.service, image_id, ref, path, engine.host_id)
    connected.follower.caught_up()
    return ref


def file_offset(volume: Volume, guest_offset: int) -> int:
    if volume.format == "raw":
        return guest_offset
    for extent in qemu.map(volume.path, fmt="qcow2"):
        start, length = extent["start"], extent["length"]
        if start <= guest_offset < start + length and extent.get("offset") is not None:
            return int(extent["offset"]) + guest_offset - int(start)
    raise AssertionError(f"guest byte {guest_offset} is not in {volume.path}")


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_in_a_snapshot_breaks_it_and_every_disk_above_it(
    engine: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    disk = engine.create_virtual_disk("r1", 64 * MiB)  # chunks of 1 MiB
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 16 * MiB, 4 * MiB, 0x5A)
    snapshot = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.wait_for_image("r1", snapshot, timeout=30)  # its digest, read before the flip
    clone = engine.create_virtual_disk("r1", 64 * MiB, base_snapshot_id=snapshot)
    engine.wait_for_image("r1", clone, timeout=30)
    ref = record_digest(engine, "r1", snapshot)
    [volume] = chain_of(engine, "r1", snapshot)
    flip_byte(volume.path, file_offset(volume, 17 * MiB + 4321))

    fixes = engine.check_storage_repository("r1", {"deep": True})

    for image in (snapshot, disk, clone):
        status = engine.get_image_status("r1", image)
        assert status.status == "broken"
        assert status.last_error is not None
        assert status.last_error.startswith(
            f"volume {ref} is rotten: data differs from its recorded digest at bytes "
            f"{17 * MiB}-{18 * MiB} (found by the deep check of "
        )
    assert {i for f in fixes if f.type == "mend" for i in f.image_ids} >= {snapshot, disk, clone}
    [found] = damage_in_log(repo_paths[0])
    assert found["image"] == snapshot  # the image that recorded the digest owns the volume
    assert found["ranges"] == [[17 * MiB, 18 * MiB]]


def stopped_deep_check(
    engine: StorageEngine,
) -> tuple[list[BaseException | None], dict[str, Any]]:
    """Start a deep check in a thread, stop it once it shows progress; what the call ended
    with (None: it finished first), and what describe_repository said of it."""
    outcome: list[BaseException | None] = []

    def deep_check() -> None:
        try:
            engine.check_storage_repository("r1", {"deep": True})
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=deep_check)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        running = engine.describe_repository("r1")["deep_check"]
        while running is None or running["percent_complete"] < 1:
            if not thread.is_alive():
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
            running = engine.describe_repository("r1")["deep_check"]
        if running is not None:
            # StrataError: it finished between the look and the stop.
            with contextlib.suppress(StrataError):
                engine.stop_fix("r1", running["image_id"], "the nightly window is over")
    finally:
        thread.join(60)
    return outcome, running or {}


def test_a_deep_check_shows_its_progress_and_is_stopped_from_another_thread(
    engine: StorageEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = engine.create_virtual_disk("r1", 256 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 0, 256 * MiB, 0x21)
    snapshot = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.wait_for_image("r1", snapshot, timeout=60)  # its own digest stage, first
    record_digest(engine, "r1", snapshot)
    # The real reading, slowed at each block it reports (about 3 s for the volume), so that
    # the stop lands while it reads whatever the machine's speed: the stop itself is not faked.
    real = digests.verify_image

    def slow(*args: Any, progress: Callable[[float], None] | None = None, **kw: Any) -> Any:
        def report(percent: float) -> None:
            time.sleep(0.05)
            if progress is not None:
                progress(percent)

        return real(*args, progress=report, **kw)

    monkeypatch.setattr("engine.executors.verify_stage.verify_image", slow)
    outcome, running = stopped_deep_check(engine)
    [error] = outcome
    assert isinstance(error, DeepCheckUnfinished)
    assert error.outcome == "stopped"
    assert error.image_id == uuid.UUID(running["image_id"])
    assert "stopped by host-a: the nightly window is over" in error.message
    assert engine.describe_repository("r1")["deep_check"] is None
    assert engine.get_image_status("r1", snapshot).status == "optimized"  # nothing recorded
