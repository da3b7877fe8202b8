"""A snapshot records the digest of the volume it makes immutable (docs/adr/0031), through the
storage API: what ``strata-log history`` shows, what the snapshot's status says meanwhile and
when the digest fails, what a copy of it elsewhere records, and a live snapshot's digest."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import QemuError, WaitTimeout
from engine.executors import digest_stage
from engine.formats.qemu import digests
from engine.formats.qemu.digests import VolumeDigest
from engine.formats.qemu.image_tools import QemuImg
from log_tools.history import history
from tests.executors.test_digest_stage import independent_digest
from tests.facade.images import Engines, MiB, prepared, run_fixes, write
from tests.hosts.hostlib import Auditor
from tests.vm import GuestWriter


def recorded(engine: StorageEngine, repo: str, image: str) -> dict[str, VolumeDigest]:
    """The digests the repository's log holds for the image, by volume."""
    auditor = Auditor(engine.describe_repository(repo)["path"])
    try:
        auditor.view.catch_up()
        found = auditor.view.image(image)
        assert found is not None
        return {
            ref: VolumeDigest(r["size"], r["chunk_size"], r["chunks"])
            for ref, r in found.digests.items()
        }
    finally:
        auditor.close()


def content_digest(engine: StorageEngine, repo: str, image: str, tmp_path: Path) -> VolumeDigest:
    with prepared(engine, repo, image) as p:
        return independent_digest(p.path, p.format, tmp_path)


def events(engine: StorageEngine, repo: str, image: str) -> list[str]:
    log_dir = os.path.join(engine.describe_repository(repo)["path"], "log")
    return [entry["event"] for entry in history(log_dir, image)]


def snapshot_of_written_disk(engine: StorageEngine, qemu: QemuImg) -> tuple[str, str]:
    disk = engine.create_virtual_disk("r1", 16 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 3 * MiB, 2 * MiB, 0x5A)
    return disk, engine.create_snapshot("r1", disk)


def test_a_snapshot_s_log_holds_the_digest_of_its_content(
    engine: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    disk, snap = snapshot_of_written_disk(engine, qemu)

    status = engine.wait_for_image("r1", snap, timeout=30)

    assert (status.status, status.stage, status.percent_complete) == ("optimized", "1/1", 100)
    assert events(engine, "r1", snap)[-2:] == ["StageCompleted", "VolumeDigested"]
    ((volume, digest),) = recorded(engine, "r1", snap).items()
    assert engine.get_volume_chain("r1", snap)[-1].volume_id == volume.split(".")[0]
    assert digest == content_digest(engine, "r1", snap, tmp_path)
    # A second snapshot of the disk: its own volume, its own digest, of what it holds.
    write(engine, qemu, "r1", disk, 12 * MiB, MiB, 0x5B)
    later = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", later, timeout=30)
    ((_, second),) = recorded(engine, "r1", later).items()
    assert second == content_digest(engine, "r1", later, tmp_path)
    assert second.digest != digest.digest


def test_a_snapshot_is_usable_while_its_digest_waits_and_wait_for_image_waits_for_it(
    engines: Engines, qemu: QemuImg
) -> None:
    maker = engines("host-a")
    disk = maker.create_virtual_disk("r1", 16 * MiB)
    maker.wait_for_image("r1", disk, timeout=30)
    maker.close()
    se = engines("host-b", run_executors=False)  # its work stays pending

    snap = se.create_snapshot("r1", disk)

    status = se.get_image_status("r1", snap)
    assert (status.status, status.stage, status.percent_complete) == ("optimized", "1/1", -1)
    with pytest.raises(WaitTimeout):
        se.wait_for_image("r1", snap, timeout=0.3)
    engines("host-c")  # runs it
    assert se.wait_for_image("r1", snap, timeout=30).percent_complete == 100
    assert len(recorded(se, "r1", snap)) == 1


@pytest.fixture
def failing_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The next digest fails as an unreadable volume would; set when it did."""
    failed = threading.Event()
    real = digests.digest_image

    def digest_image(path: str, fmt: str, **kwargs: object) -> VolumeDigest:
        if not failed.is_set():
            failed.set()
            raise QemuError(command=f"qemu-nbd {path}", returncode=1, stderr="Input/output error")
        return real(path, fmt, **kwargs)  # type: ignore[arg-type]  # progress, cancel, reuse

    monkeypatch.setattr(digest_stage, "digest_image", digest_image)
    yield failed


def test_a_failed_digest_leaves_the_snapshot_usable_with_its_reason_and_a_mend(
    engine: StorageEngine, qemu: QemuImg, tmp_path: Path, failing_once: threading.Event
) -> None:
    _, snap = snapshot_of_written_disk(engine, qemu)

    status = engine.wait_for_image("r1", snap, timeout=30)

    assert failing_once.is_set()
    assert status.status == "optimized"  # its data is all there
    assert status.last_error is not None and "Input/output error" in status.last_error
    mends = [f for f in engine.check_storage_repository("r1") if f.type == "mend"]
    assert [list(f.image_ids) for f in mends] == [[snap]]
    assert run_fixes(engine, "r1", "mend") == 1
    status = engine.get_image_status("r1", snap)
    assert (status.status, status.last_error) == ("optimized", None)
    ((_, digest),) = recorded(engine, "r1", snap).items()
    assert digest == content_digest(engine, "r1", snap, tmp_path)


def test_a_copy_of_a_snapshot_elsewhere_keeps_its_id_and_its_digest(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    _, snap = snapshot_of_written_disk(engine, qemu)
    engine.wait_for_image("r1", snap, timeout=30)

    copy = engine.copy_image("r2", snap)
    engine.wait_for_image("r2", copy, timeout=30)

    assert copy == snap
    (here,) = recorded(engine, "r1", snap).values()
    (there,) = recorded(engine, "r2", copy).values()
    assert there == here


@pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed",
)
def test_a_live_snapshot_s_digest_is_of_its_content_not_of_later_writes(
    engines: Engines, tmp_path: Path
) -> None:
    se = engines("host-a")
    disk = se.create_virtual_disk("r1", 16 * MiB)
    se.wait_for_image("r1", disk, timeout=30)
    uri = se.attach_image("r1", disk).nbd_uri
    with GuestWriter(uri, length=4 * MiB) as writer:
        writer.wait_for_writes(30)
        snap = se.create_snapshot("r1", disk)
        writer.wait_for_writes(len(writer.writes) + 30)  # into the disk's new top
        se.wait_for_image("r1", snap, timeout=30)
        writer.wait_for_writes(len(writer.writes) + 30)
        writer.stop()
        assert writer.error is None

    (digest,) = recorded(se, "r1", snap).values()
    assert digest == content_digest(se, "r1", snap, tmp_path)


@pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed",
)
def test_a_snapshot_removed_while_its_digest_runs_leaves_its_volume_free_to_commit_into(
    engines: Engines,
) -> None:
    se = engines("host-a")
    disk = se.create_virtual_disk("r1", 64 * MiB)
    se.wait_for_image("r1", disk, timeout=30)
    uri = se.attach_image("r1", disk).nbd_uri
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 48M", uri], check=True, capture_output=True
    )
    with GuestWriter(uri, length=4 * MiB) as writer:
        writer.wait_for_writes(20)

        se.remove_image("r1", se.create_snapshot("r1", disk))  # its digest may be running
        base, top = se.get_volume_chain("r1", disk)
        se.block_commit("r1", disk, top.volume_id, base.volume_id)

        status = se.wait_for_image("r1", disk, timeout=60)
        writer.wait_for_writes(len(writer.writes) + 20)
        writer.stop()
        assert writer.error is None
    job = se.get_block_job("r1", disk)
    assert job is not None and job.state == "completed", job
    assert status.status == "optimized", status
    assert [v.volume_id for v in se.get_volume_chain("r1", disk)] == [base.volume_id]
    writer.verify(uri, "raw")


def test_a_commit_into_a_removed_snapshot_s_volume_is_no_rot(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk, snap = snapshot_of_written_disk(engine, qemu)
    engine.wait_for_image("r1", snap, timeout=30)
    write(engine, qemu, "r1", disk, 9 * MiB, 2 * MiB, 0x22)
    engine.remove_image("r1", snap)
    base, top = engine.get_volume_chain("r1", disk)
    engine.block_commit("r1", disk, top.volume_id, base.volume_id)  # offline: qemu-img commit
    engine.wait_for_image("r1", disk, timeout=30)

    engine.check_storage_repository("r1", {"deep": True})

    assert engine.get_image_status("r1", disk).status == "optimized"
