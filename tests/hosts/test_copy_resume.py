"""A copy killed with SIGKILL (the whole host: its process and its qemu-nbd) is resumed by another
host from the last checkpoint in the log, and writes again at most one checkpoint interval more
than what was left (docs/adr/0032).

The bytes are the kernel's count: ``write_bytes`` of ``/proc/<pid>/io`` of the qemu-nbd that
writes the target (with O_DIRECT: each byte sent to the disk), read for the killed host while
it is frozen (SIGSTOP) right before the kill, and recorded for the resuming one in its
checkpoints (``written``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg
from tests.hosts.hostlib import (
    HostProcess,
    MiB,
    events,
    eventually,
    host_spec,
    snapshot_with_data,
    writer_of,
    written_by,
)

SIZE = 128 * MiB
CHUNK = MiB  # engine.formats.qemu.digests.chunk_size_for(SIZE): the checkpoint interval
SLACK = 64 * 1024
qemu = QemuImg()


def checkpoints(repo_path: str) -> list[tuple[str, dict[str, Any]]]:
    return [(h, f) for n, h, f in events(repo_path) if n == "StageCheckpointed"]


def reached(repo_path: str, host: str, percent: int) -> bool:
    return any(h == host and f["percent"] >= percent for h, f in checkpoints(repo_path))


def kill_when(a: HostProcess, repo_path: str, percent: int) -> int:
    """Freeze host A once it has checkpointed ``percent``, read what its writer wrote, then
    kill the whole host; the bytes it wrote."""
    eventually(lambda: reached(repo_path, "host-a", percent), timeout=60)
    a.signal_group(signal.SIGSTOP)
    try:
        written = written_by(writer_of(a.proc.pid))
    finally:
        a.kill()
    return written


@pytest.mark.parametrize("percent", [10, 50, 90])
def test_a_copy_killed_midway_is_resumed_by_another_host_rewriting_at_most_one_checkpoint(
    tmp_path: Path, repos: dict[str, str], percent: int
) -> None:
    snapshot = snapshot_with_data(tmp_path, repos, SIZE)
    steps = [
        {
            "call": "copy_image",
            "args": ["r2", snapshot],
            "kwargs": {"options": {"strategy": "performance"}},  # a raw copy: data bytes only
            "save": "copy",
        }
    ]
    a = HostProcess(host_spec("host-a", tmp_path / "a", repos, slow_rate="64M", steps=steps))
    copy = a.saved("copy")
    written_before = kill_when(a, repos["r2"], percent)
    left = SIZE - written_before

    b = StorageEngine("host-b", state_dir=str(tmp_path / "b"), lease_timeout=1.0, poll_interval=0.1)
    try:
        for name, path in repos.items():
            b.connect_storage_repository(name, "localfs-1.0", {"path": path})
        b.wait_for_image("r2", copy, timeout=60)
        source = b.prepare_image("r1", snapshot)
        target = b.prepare_image("r2", copy)
        assert qemu.compare(source.path, target.path, a_fmt=source.format, b_fmt=target.format)
        b.teardown_image("r1", snapshot)
        b.teardown_image("r2", copy)
    finally:
        b.close()

    resumed = [f for h, f in checkpoints(repos["r2"]) if h == "host-b"]
    written_after = resumed[-1]["written"]
    assert resumed[0]["offset"] >= percent * SIZE // 100  # from the checkpoint, not from zero
    # One chunk (the interval) at most, and the odd sector: a write the kernel had started
    # counting when the host froze, or what the file system wrote for the writer.
    assert left - CHUNK <= written_after <= left + CHUNK + SLACK
    print(
        f"killed at {percent}%: {written_before} bytes written, {left} left, "
        f"{written_after} written after the restart (ratio {written_after / left:.3f})"
    )


def test_an_incremental_copy_killed_midway_is_resumed_by_another_host(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    size = 64 * MiB
    with StorageEngine("host-setup", state_dir=str(tmp_path / "setup"), poll_interval=0.1) as se:
        for name, path in repos.items():
            se.connect_storage_repository(name, "localfs-1.0", {"path": path})
        disk = se.create_virtual_disk("r1", size)
        se.wait_for_image("r1", disk, timeout=30)
        prepared = se.prepare_image("r1", disk)
        qemu.write_pattern(prepared.path, prepared.format, 0, size, 0x31)
        se.teardown_image("r1", disk)
        first = se.create_snapshot("r1", disk)
        se.wait_for_image("r1", disk, timeout=30)
        base = se.copy_image("r2", first)
        se.wait_for_image("r2", base, timeout=60)
        prepared = se.prepare_image("r1", disk)
        for n in range(0, size, MiB):  # one changed cluster in every MiB
            qemu.write_pattern(prepared.path, prepared.format, n + 192 * 1024, 64 * 1024, 0x32)
        se.teardown_image("r1", disk)
        second = se.create_snapshot("r1", disk)
        se.wait_for_image("r1", disk, timeout=30)
    steps = [{"call": "copy_image", "args": ["r2", second, base], "save": "copy"}]
    a = HostProcess(host_spec("host-a", tmp_path / "a", repos, slow_rate="32M", steps=steps))
    copy = a.saved("copy")
    kill_when(a, repos["r2"], 50)

    with StorageEngine(
        "host-b", state_dir=str(tmp_path / "b"), lease_timeout=1.0, poll_interval=0.1
    ) as b:
        for name, path in repos.items():
            b.connect_storage_repository(name, "localfs-1.0", {"path": path})
        b.wait_for_image("r2", copy, timeout=60)
        source = b.prepare_image("r1", second)
        target = b.prepare_image("r2", copy)
        assert qemu.compare(source.path, target.path, a_fmt=source.format, b_fmt=target.format)
        top = qemu.map(target.path, fmt="qcow2")
        assert sum(e["length"] for e in top if e["depth"] == 0 and e["data"]) == 64 * 64 * 1024
        b.teardown_image("r1", second)
        b.teardown_image("r2", copy)

    resumed = [f for h, f in checkpoints(repos["r2"]) if h == "host-b"]
    assert resumed[0]["offset"] >= size // 2
