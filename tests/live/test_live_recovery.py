"""Recovery of live work, both ways (docs/adr/0028): the engine killed while its daemon lives
on (the restarted engine finds the job and finishes it), and the whole host killed, daemon
included (another host finishes the work offline). Every host is a real process, killed with
SIGKILL; each daemon is killed by pid at the end, whatever happened."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.formats.qemu.storage_daemon import StorageDaemon
from tests.facade.images import MiB
from tests.hosts.hostlib import HostProcess, events, host_spec
from tests.live.test_block_jobs import chain_of, job_end
from tests.vm import GuestWriter, qemu_io

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed (Debian: qemu-system-common, "
    "qemu-utils)",
)


def slow_commit_disk(repo: str, state_dir: str) -> tuple[str, str, str, str]:
    """:func:`slow_disk` whose top holds 48 MiB (pattern 9) over 16 MiB in the base."""
    return slow_disk(repo, state_dir, base_mib=16, top_mib=48)


def slow_disk(
    repo: str, state_dir: str, *, base_mib: int, top_mib: int
) -> tuple[str, str, str, str]:
    """On host-a (closed again, its daemon serving on): an attached 64 MiB disk whose base,
    which no other image reads, holds ``base_mib`` (pattern 7) and its top ``top_mib`` (pattern
    9) from offset 0. Returns the disk, its URI, base and top ids."""
    with StorageEngine("host-a", state_dir=state_dir, lease_timeout=1.0) as se:
        se.create_storage_repository("localfs-1.0", {"path": repo})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
        disk = se.create_virtual_disk("r1", 64 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        uri = se.attach_image("r1", disk).nbd_uri
        qemu_io(uri, "raw", f"write -P 7 0 {base_mib}M")
        se.remove_image("r1", se.create_snapshot("r1", disk))
        if top_mib:
            qemu_io(uri, "raw", f"write -P 9 0 {top_mib}M")
        base, top = chain_of(se, disk)
    return disk, uri, base, top


def start_commit_and_kill(repo: str, state_dir: str, disk: str, top: str, base: str) -> HostProcess:
    """host-a starts a throttled active commit and is SIGKILLed (:func:`start_job_and_kill`)."""
    return start_job_and_kill(repo, state_dir, "block_commit", [disk, top, base])


def start_job_and_kill(repo: str, state_dir: str, call: str, args: list[str]) -> HostProcess:
    """host-a in a process of its own starts a block job limited to 2 MiB/s; it is SIGKILLed
    once the job has made progress (the daemon, in a session of its own, lives on)."""
    step = {"call": call, "args": ["r1", *args], "kwargs": {"bandwidth": 2 * MiB}, "save": "job"}
    host = HostProcess(host_spec("host-a", state_dir, {"r1": repo}, steps=[step]))
    host.saved("job")
    deadline = time.monotonic() + 30
    while not any(name == "StageProgressed" for name, _, _ in events(repo)):
        assert time.monotonic() < deadline, "the job never progressed"
        time.sleep(0.05)
    host.kill()
    return host


def test_engine_killed_while_the_daemon_lives_finds_its_job(
    repo_paths: tuple[str, str], state_dir: Callable[[], str]
) -> None:
    repo = repo_paths[0]
    directory = state_dir()
    disk, uri, base, top = slow_commit_disk(repo, directory)
    with GuestWriter(uri, start=48 * MiB, length=8 * MiB, pause=0.005) as writer:
        start_commit_and_kill(repo, directory, disk, top, base)
        daemon = StorageDaemon(directory)
        assert daemon.pid is not None
        assert [j.status for j in daemon.query_jobs()] in (["running"], ["ready"])
        daemon.close()
        with StorageEngine("host-a", state_dir=directory, lease_timeout=1.0) as se:
            se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
            # At 2 MiB/s the commit never catches up with the writer: lift the limit.
            se.set_block_job_bandwidth("r1", disk, 0)
            job = job_end(se, disk, timeout=60)
            assert job.state == "completed", job
            assert chain_of(se, disk) == [base]
            writer.wait_for_writes(len(writer.writes) + 20)
            writer.verify(uri, "raw")
            qemu_io(uri, "raw", "read -P 9 0 48M", read_only=True)
    daemon = StorageDaemon(directory)  # the engine let go of the monitor (one client at a time)
    assert daemon.query_jobs() == []
    daemon.close()


def test_host_killed_with_its_daemon_another_host_finishes_offline(
    repo_paths: tuple[str, str], state_dir: Callable[[], str]
) -> None:
    repo = repo_paths[0]
    state_a, state_b = state_dir(), state_dir()
    disk, uri, base, top = slow_commit_disk(repo, state_a)
    with GuestWriter(uri, start=48 * MiB, length=8 * MiB, pause=0.005) as writer:
        writer.wait_for_writes(20)
        start_commit_and_kill(repo, state_a, disk, top, base)
        pid = StorageDaemon(state_a).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the host is gone, the virtual machine with it
        writer.stop()
    acknowledged = writer.last_patterns()
    with StorageEngine("host-b", state_dir=state_b, lease_timeout=1.0) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
        job = job_end(se, disk, timeout=60)
        assert job.state == "completed", job
        assert chain_of(se, disk) == [base]
        assert se.get_image_status("r1", disk).status == "optimized"
        assert se.list_attachments() == []
        path = se.prepare_image("r1", disk).path
    qemu_io(path, "qcow2", "read -P 9 0 48M", read_only=True)
    for offset, pattern in acknowledged.items():
        qemu_io(path, "qcow2", f"read -P {pattern} {offset} 64K", read_only=True)
    released = [e for name, _, e in events(repo) if name == "AttachmentReleased"]
    assert [e["of_host"] for e in released] == ["host-a"]
    assert Path(path).exists()


def test_a_daemon_gone_on_its_own_releases_its_images_at_the_next_connect(
    repo_paths: tuple[str, str], state_dir: Callable[[], str]
) -> None:
    repo = repo_paths[0]
    directory = state_dir()
    disk, uri, _, _ = slow_commit_disk(repo, directory)
    pid = StorageDaemon(directory).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with StorageEngine("host-a", state_dir=directory, lease_timeout=1.0) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
        assert se.list_attachments() == []
        released = [e for name, _, e in events(repo) if name == "AttachmentReleased"]
        assert [e["of_host"] for e in released] == ["host-a"]
        again = se.attach_image("r1", disk)
        assert again.nbd_uri == uri
        qemu_io(again.nbd_uri, "raw", "read -P 9 0 48M", read_only=True)
        se.detach_image("r1", disk)


def test_host_killed_during_a_pull_another_host_folds_the_rest_offline(
    repo_paths: tuple[str, str], state_dir: Callable[[], str]
) -> None:
    repo = repo_paths[0]
    state_a, state_b = state_dir(), state_dir()
    disk, uri, _, top = slow_disk(repo, state_a, base_mib=48, top_mib=0)
    with GuestWriter(uri, start=48 * MiB, length=8 * MiB, pause=0.005) as writer:
        writer.wait_for_writes(20)
        start_job_and_kill(repo, state_a, "block_pull", [disk])
        pid = StorageDaemon(state_a).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        writer.stop()
    acknowledged = writer.last_patterns()
    with StorageEngine("host-b", state_dir=state_b, lease_timeout=1.0) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
        assert job_end(se, disk, timeout=120).state == "completed"
        assert chain_of(se, disk) == [top]
        path = se.prepare_image("r1", disk).path
    qemu_io(path, "qcow2", "read -P 7 0 48M", read_only=True)
    for offset, pattern in acknowledged.items():
        qemu_io(path, "qcow2", f"read -P {pattern} {offset} 64K", read_only=True)
