"""Block jobs (docs/adr/0028): pull and commit on an attached image while a virtual machine
writes, and the same calls offline on a detached one, with the same job view."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from engine import BlockJob, StorageEngine
from engine.errors import ImageInUse, InvalidParameter
from tests.facade.images import Engines, MiB, run_fixes
from tests.vm import GuestWriter, qemu_io

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed (Debian: qemu-system-common, "
    "qemu-utils)",
)

SIZE = 16 * MiB


def job_end(se: StorageEngine, disk: str, timeout: float = 60) -> BlockJob:
    """Poll the job view until the job ended, then wait for the image to settle."""
    deadline = time.monotonic() + timeout
    while True:
        job = se.get_block_job("r1", disk)
        assert job is not None
        if job.state in ("completed", "failed", "aborted"):
            se.wait_for_image("r1", disk, timeout=timeout)
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def chain_of(se: StorageEngine, image: str) -> list[str]:
    return [v.volume_id for v in se.get_volume_chain("r1", image)]


def layered_disk(
    se: StorageEngine, layers: int, *, keep_snapshots: bool, size: int = SIZE
) -> tuple[str, str]:
    """An attached disk of ``layers`` volumes, each layer's 1 MiB at offset i MiB written with
    pattern i + 1 through the export; the snapshots that made the layers kept or removed."""
    disk = se.create_virtual_disk("r1", size)
    se.wait_for_image("r1", disk, timeout=30)
    uri = se.attach_image("r1", disk).nbd_uri
    for layer in range(layers):
        qemu_io(uri, "raw", f"write -P {layer + 1} {layer}M 1M")
        if layer < layers - 1:
            snap = se.create_snapshot("r1", disk)
            if not keep_snapshots:
                se.remove_image("r1", snap)
    return disk, uri


def reads_layers(target: str, fmt: str, layers: int) -> None:
    qemu_io(target, fmt, *(f"read -P {i + 1} {i}M 1M" for i in range(layers)), read_only=True)


def test_full_pull_under_writes(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = layered_disk(se, 3, keep_snapshots=True)
    with GuestWriter(uri, start=8 * MiB, length=4 * MiB) as writer:
        writer.wait_for_writes(20)
        job_id = se.block_pull("r1", disk)
        job = job_end(se, disk)
        assert (job.job_id, job.kind, job.state, job.error) == (job_id, "pull", "completed", None)
        writer.wait_for_writes(len(writer.writes) + 20)
        writer.verify(uri, "raw")
    assert len(chain_of(se, disk)) == 1
    reads_layers(uri, "raw", 3)
    se.detach_image("r1", disk)
    top = se.prepare_image("r1", disk).path
    assert "backing-filename" not in qemu_info(top)
    reads_layers(top, "qcow2", 3)


def test_partial_pull_keeps_the_base(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = layered_disk(se, 3, keep_snapshots=True)
    base, _, top = chain_of(se, disk)
    se.block_pull("r1", disk, base_volume_id=base)
    assert job_end(se, disk).state == "completed"
    assert chain_of(se, disk) == [base, top]
    reads_layers(uri, "raw", 3)
    se.detach_image("r1", disk)
    path = se.prepare_image("r1", disk).path
    assert qemu_info(path)["backing-filename"] == f"{base}.qcow2"


def test_intermediate_commit_under_writes(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = layered_disk(se, 3, keep_snapshots=False)
    base, middle, top = chain_of(se, disk)
    with GuestWriter(uri, start=8 * MiB, length=4 * MiB) as writer:
        writer.wait_for_writes(20)
        se.block_commit("r1", disk, middle, base)
        assert job_end(se, disk).state == "completed"
        writer.verify(uri, "raw")
    assert chain_of(se, disk) == [base, top]
    reads_layers(uri, "raw", 3)
    se.detach_image("r1", disk)
    path = se.prepare_image("r1", disk).path
    assert qemu_info(path)["backing-filename"] == f"{base}.qcow2"
    reads_layers(path, "qcow2", 3)


def test_active_commit_pivots_under_writes(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = layered_disk(se, 2, keep_snapshots=False)
    base, top = chain_of(se, disk)
    with GuestWriter(uri, start=8 * MiB, length=4 * MiB) as writer:
        writer.wait_for_writes(20)
        se.block_commit("r1", disk, top, base)
        job = job_end(se, disk)
        assert (job.kind, job.state) == ("commit", "completed")
        writer.wait_for_writes(len(writer.writes) + 20)
        writer.verify(uri, "raw")
    assert chain_of(se, disk) == [base]
    se.detach_image("r1", disk)
    path = se.prepare_image("r1", disk).path
    writer.verify(path, "qcow2")
    reads_layers(path, "qcow2", 2)


def test_commit_into_a_volume_another_image_reads_is_refused(engines: Engines) -> None:
    se = engines("host-a")
    disk, _ = layered_disk(se, 2, keep_snapshots=True)
    base, top = chain_of(se, disk)
    assert se.get_volume_chain("r1", disk)[0].shared
    with pytest.raises(ImageInUse):
        se.block_commit("r1", disk, top, base)
    with pytest.raises(InvalidParameter):
        se.block_commit("r1", disk, base, top)
    assert se.get_block_job("r1", disk) is None


def test_bandwidth_and_abort(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = layered_disk(se, 1, keep_snapshots=False, size=64 * MiB)
    qemu_io(uri, "raw", "write -P 7 0 48M")
    snap = se.create_snapshot("r1", disk)
    se.remove_image("r1", snap)
    base, top = chain_of(se, disk)
    qemu_io(uri, "raw", "write -P 9 0 48M")
    se.block_commit("r1", disk, top, base, bandwidth=1 * MiB)
    time.sleep(0.5)
    job = se.get_block_job("r1", disk)
    assert job is not None and job.state == "running" and job.bandwidth == 1 * MiB, job
    se.set_block_job_bandwidth("r1", disk, 2 * MiB)
    job = se.get_block_job("r1", disk)
    assert job is not None and job.bandwidth == 2 * MiB and job.cur < job.end, job
    se.abort_block_job("r1", disk)
    assert job_end(se, disk).state == "aborted"
    assert chain_of(se, disk) == [base, top]
    assert se.get_image_status("r1", disk).status == "optimized"
    qemu_io(uri, "raw", "read -P 9 0 48M", read_only=True)


def test_offline_jobs_have_the_same_view(engines: Engines) -> None:
    se = engines("host-a")
    disk, _ = layered_disk(se, 3, keep_snapshots=False)
    se.detach_image("r1", disk)
    base, middle, top = chain_of(se, disk)
    se.block_commit("r1", disk, middle, base)
    job = job_end(se, disk)
    assert (job.kind, job.state, job.cur, job.end) == ("commit", "completed", SIZE, SIZE)
    assert chain_of(se, disk) == [base, top]
    se.block_pull("r1", disk)
    assert job_end(se, disk).state == "completed"
    assert chain_of(se, disk) == [top]
    reads_layers(se.prepare_image("r1", disk).path, "qcow2", 3)


def qemu_info(path: str) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], check=True, capture_output=True
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def test_merge_fix_on_an_attached_disk_runs_live(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = layered_disk(se, 3, keep_snapshots=True)
    snapshots = [i.image_id for i in se.list_images("r1") if i.kind == "snapshot"]
    for snap in snapshots:
        se.remove_image("r1", snap)
    with GuestWriter(uri, start=8 * MiB, length=4 * MiB) as writer:
        writer.wait_for_writes(20)
        for _ in range(2):  # one merge per family at a time: the base, then the middle
            assert run_fixes(se, "r1", "merge") == 1
        writer.wait_for_writes(len(writer.writes) + 20)
        writer.verify(uri, "raw")
    assert len(chain_of(se, disk)) == 1
    assert se.get_image_status("r1", disk).status == "optimized"
    deadline = time.monotonic() + 30
    while run_fixes(se, "r1", "clean"):  # both removed snapshots' volumes, while attached
        assert time.monotonic() < deadline
    (volume,) = se.get_volume_chain("r1", disk)
    volumes = Path(volume.path).parent
    # A clean runs on the removed image it frees, which nobody can wait for by its id.
    while sorted(p.name for p in volumes.iterdir()) != [Path(volume.path).name]:
        assert time.monotonic() < deadline, sorted(volumes.iterdir())
        time.sleep(0.05)
    reads_layers(uri, "raw", 3)
    se.detach_image("r1", disk)
    writer.verify(se.prepare_image("r1", disk).path, "qcow2")
