"""The virtual machine the tests play: a writer that records only what was acknowledged, and a
check that finds any acknowledged write missing, on a local qcow2 and through a daemon's export."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from engine.errors import DaemonError
from engine.formats.qemu.storage_daemon import ChainVolume, StorageDaemon
from tests.vm import GuestWriter, KiB, MiB, qemu_io, run


def qcow2(path: Path, size: int) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    return path


def test_every_acknowledged_write_reads_back_with_its_last_pattern(tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 4 * MiB)
    with GuestWriter(disk, "qcow2", start=1 * MiB, length=1 * MiB, block=64 * KiB) as writer:
        writer.wait_for_writes(40)  # more than two passes over the 16 blocks
        writer.verify(disk, "qcow2")

    assert writer.error is None
    assert all(w.latency > 0 and w.acked >= w.sent for w in writer.writes)
    assert len({(w.offset, w.pattern) for w in writer.writes}) == len(writer.writes)
    assert set(writer.last_patterns()) == {1 * MiB + i * 64 * KiB for i in range(16)}
    qemu_io(disk, "qcow2", "read -P 0 0 1M", "read -P 0 2M 2M", read_only=True)


def test_a_write_lost_after_its_acknowledgement_is_found(tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 1 * MiB)
    with GuestWriter(disk, "qcow2", length=1 * MiB) as writer:
        writer.wait_for_writes(20)
        writer.stop()
        lost = writer.writes[-1]
        qemu_io(disk, "qcow2", f"write -P {lost.pattern ^ 0xFF} {lost.offset} 4k")

        with pytest.raises(AssertionError, match=f"1 of 16 .*{lost.offset} "):
            writer.verify(disk, "qcow2")


def test_a_failed_write_stops_the_writer_and_fails_the_check(tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 1 * MiB)
    with GuestWriter(disk, "qcow2", length=2 * MiB, block=256 * KiB) as writer:
        with pytest.raises(AssertionError, match="the writer failed"):
            writer.wait_for_writes(100, timeout=30)

        assert len(writer.writes) == 4  # the blocks inside the disk, and none past its end
        with pytest.raises(AssertionError, match="saw an error: write at 1048576"):
            writer.verify(disk, "qcow2")


@pytest.fixture
def state_dir() -> Iterator[str]:
    # Not tmp_path: its long names would not fit in a Unix socket's 108 bytes.
    path = tempfile.mkdtemp(prefix="s", dir="/tmp")
    daemon = StorageDaemon(path, timeout=5.0)
    try:
        yield path
    finally:
        with suppress(DaemonError):
            daemon.stop()  # QMP quit, then SIGKILL by pid if it lingers
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="no qemu-storage-daemon")
def test_a_writer_through_a_daemons_export_is_read_back_from_the_volume(
    state_dir: str, tmp_path: Path
) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 8 * MiB)
    daemon = StorageDaemon(state_dir, timeout=10.0)
    try:
        node = daemon.add_chain([ChainVolume("disk", str(disk), "qcow2")], read_only=False)
        uri = daemon.export_nbd(node, "disk1", writable=True)
        with GuestWriter(uri, "raw", length=8 * MiB) as writer:
            writer.wait_for_writes(50)
            writer.verify(uri, "raw")  # through the export, the daemon still serving
        daemon.unexport("disk1")
        daemon.remove_nodes(["disk"])
    finally:
        daemon.stop()

    writer.verify(disk, "qcow2")  # and in the file, once the daemon let go
