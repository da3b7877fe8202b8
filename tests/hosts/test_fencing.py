"""A host counted dead that comes back must not corrupt anything (architecture §5): its appends are
refused, its copies land in files nobody publishes, and in-place work is serialized by QEMU's
image locks, which the executors wait for instead of failing."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import QemuError
from engine.formats.qemu.image_tools import QemuImg
from tests.hosts.hostlib import (
    MiB,
    claims,
    events,
    host_a_copying,
    temporaries,
)

qemu = QemuImg()


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def writers_of(path: str) -> list[int]:
    """Processes with ``path`` open (found through /proc, as lsof would)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in fds):
                found.append(int(pid))
        except OSError:
            continue  # the process ended or is not ours to look at: not a writer of ours
    return found


def test_a_paused_host_that_comes_back_after_a_takeover_corrupts_nothing(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    snapshot, a, copy = host_a_copying(tmp_path, repos, slow_rate="1M")
    [a_temp] = temporaries(repos["r2"])
    assert a_temp.endswith("-e1")  # host A writes into a file tagged with its claim epoch

    a.signal_group(signal.SIGSTOP)  # the host and its qemu-img, frozen mid-copy
    with StorageEngine(
        "host-b", state_dir=str(tmp_path / "b"), lease_timeout=1.0, poll_interval=0.1
    ) as b:
        for name, path in repos.items():
            b.connect_storage_repository(name, "localfs-1.0", {"path": path})
        b.wait_for_image("r2", copy, timeout=30)
        volume = b.prepare_image("r2", copy).path
        b.teardown_image("r2", copy)
        published = digest(volume)
        history = events(repos["r2"])

        a.signal_group(signal.SIGCONT)  # back, well past lease_timeout, as if nothing happened
        time.sleep(2.0)  # long enough for its copy to have finished at 1 MiB/s from where it was

        assert events(repos["r2"])[: len(history)] == history
        assert [n for n, h, _ in events(repos["r2"])[len(history) :] if h == "host-a"] == []
        assert claims(repos["r2"]) == [("host-a", 1), ("host-b", 2)]
        assert digest(volume) == published
        assert temporaries(repos["r2"]) == []  # A's file was dropped, never published
        assert writers_of(volume) == []
        src = b.prepare_image("r1", snapshot)
        assert qemu.compare(src.path, volume, a_fmt=src.format, b_fmt="qcow2")
        b.teardown_image("r1", snapshot)
    a.send("report")  # host A still works: its executor did not fail on the lost claim
    assert copy in a.wait_for("report")["report"]["r2"]["images"]
    assert a.close() == 0


@pytest.fixture
def disk_in_use(tmp_path: Path, repos: dict[str, str]) -> Iterator[tuple[StorageEngine, str]]:
    with StorageEngine(
        "host-a", state_dir=str(tmp_path / "a"), lease_timeout=1.0, poll_interval=0.1
    ) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repos["r1"]})
        disk = se.create_virtual_disk("r1", 4 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        prepared = se.prepare_image("r1", disk)
        qemu.write_pattern(prepared.path, prepared.format, 0, MiB, 0x3C)
        se.teardown_image("r1", disk)
        yield se, disk


def hold_write_lock(path: str) -> subprocess.Popen[bytes]:
    """A process that has the image open for writing, as a fenced host's qemu-img would."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        holder = subprocess.Popen(
            ["qemu-io", "-f", "qcow2", "-c", "sleep 60000", path], stderr=subprocess.DEVNULL
        )
        # Looking takes a read lock, which can make the holder's own open fail: then it exits
        # and is started again. Once it holds its lock, looking only ever sees the lock.
        while holder.poll() is None and time.monotonic() < deadline:
            look = subprocess.run(["qemu-img", "info", path], capture_output=True)
            if b'Failed to get shared "write" lock' in look.stderr and holder.poll() is None:
                return holder
            time.sleep(0.05)
        holder.kill()
        holder.wait()
    raise AssertionError(f"could not hold {path} open for writing")


def test_a_second_qemu_img_on_a_locked_volume_fails_and_writes_nothing(
    disk_in_use: tuple[StorageEngine, str],
) -> None:
    se, disk = disk_in_use
    path = se.prepare_image("r1", disk).path
    se.teardown_image("r1", disk)
    before = digest(path)
    holder = hold_write_lock(path)
    try:
        with pytest.raises(QemuError, match='Failed to get "write" lock'):
            qemu.resize(path, 8 * MiB, fmt="qcow2")
        with pytest.raises(QemuError, match='Failed to get "write" lock'):
            qemu.rebase(path, None, fmt="qcow2")
        assert digest(path) == before
    finally:
        holder.kill()
        holder.wait()


def test_in_place_work_on_a_locked_volume_waits_for_the_lock_instead_of_failing(
    disk_in_use: tuple[StorageEngine, str],
    repos: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="engine.executors")
    se, disk = disk_in_use
    path = se.prepare_image("r1", disk).path
    se.teardown_image("r1", disk)
    holder = hold_write_lock(path)
    try:
        se.resize_virtual_disk("r1", disk, 8 * MiB)
        time.sleep(1.5)  # several attempts, each refused by QEMU's lock

        status = se.get_image_status("r1", disk)
        assert status.last_error is None
        assert "StageFailed" not in [
            n for n, _, _ in events(os.path.dirname(os.path.dirname(path)))
        ]
        assert qemu.info(path, fmt="qcow2")["virtual-size"] == 4 * MiB
    finally:
        holder.kill()
        holder.wait()

    assert se.wait_for_image("r1", disk, timeout=30).status == "optimized"
    assert qemu.info(path, fmt="qcow2")["virtual-size"] == 8 * MiB
    # The operator sees why the stage waited, once, with the volume and the image named.
    [waiting] = [r for r in caplog.records if "is locked by another process" in r.message]
    assert getattr(waiting, "path", None) == path
    assert getattr(waiting, "image", None) == str(disk)
    assert qemu.read_pattern_matches(path, "qcow2", 0, MiB, 0x3C)
