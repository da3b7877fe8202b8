"""A live snapshot (docs/adr/0028): an attached disk switches to a new overlay while a virtual
machine keeps writing; the snapshot holds the disk as it was at one instant of the call."""

from __future__ import annotations

import shutil
import time

import pytest

from engine import StorageEngine
from tests.facade.images import Engines, MiB
from tests.live.content import allowed_at, block_patterns
from tests.vm import GuestWriter

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed (Debian: qemu-system-common, "
    "qemu-utils)",
)


def attached_disk(se: StorageEngine, size: int = 16 * MiB) -> tuple[str, str]:
    disk = se.create_virtual_disk("r1", size)
    se.wait_for_image("r1", disk, timeout=30)
    return disk, se.attach_image("r1", disk).nbd_uri


def test_live_snapshot_under_writes(engines: Engines) -> None:
    se = engines("host-a")
    disk, uri = attached_disk(se)
    with GuestWriter(uri, length=4 * MiB) as writer:
        writer.wait_for_writes(50)
        since = time.perf_counter()
        snap = se.create_snapshot("r1", disk)
        until = time.perf_counter()
        writer.wait_for_writes(len(writer.writes) + 50)
        writer.stop()
        assert writer.error is None
        status = se.get_image_status("r1", disk)
        assert status.status == "optimized", status
        chain = se.get_volume_chain("r1", disk)
        assert len(chain) == 2
        snapshot_top = se.get_volume_chain("r1", snap)[-1]
        assert snapshot_top.volume_id == chain[0].volume_id
        assert chain[0].shared and not chain[1].shared
        held = block_patterns(snapshot_top.path, snapshot_top.format, writer)
        allowed = allowed_at(writer, since, until)
        wrong = {o: (p, allowed[o]) for o, p in held.items() if p not in allowed[o]}
        assert not wrong, f"blocks of the snapshot not of one instant of the call: {wrong}"
        writer.verify(uri, "raw")
    se.detach_image("r1", disk)
    writer.verify(se.prepare_image("r1", disk).path, "qcow2")


def test_work_with_no_live_form_waits_for_the_detach(engines: Engines) -> None:
    """A performance-strategy disk wants its chain flattened after a snapshot: a copy that
    would switch the volume the daemon serves, so it waits until the disk is detached."""
    se = engines("host-a")
    disk = se.create_virtual_disk("r1", 16 * MiB, options={"strategy": "performance"})
    se.wait_for_image("r1", disk, timeout=30)
    uri = se.attach_image("r1", disk).nbd_uri
    with GuestWriter(uri, length=4 * MiB) as writer:
        writer.wait_for_writes(20)
        se.create_snapshot("r1", disk)
        status = se.wait_for_image("r1", disk, timeout=30)  # settled: it waits for the detach
        assert status.status == "degraded", status
        assert len(se.get_volume_chain("r1", disk)) == 2
        writer.verify(uri, "raw")
    se.detach_image("r1", disk)
    assert se.wait_for_image("r1", disk, timeout=60).status == "optimized"
    assert len(se.get_volume_chain("r1", disk)) == 1
    writer.verify(se.prepare_image("r1", disk).path, "raw")
