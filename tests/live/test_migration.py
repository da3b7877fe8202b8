"""Live storage migration (docs/adr/0029, seed 003): a disk moves to another repository while a
virtual machine writes through its export, in one call or in seed 003's five verbs; finishing
onto the source aborts; each refusal carries seed 003's code and changes nothing.

Real qemu-storage-daemon, qemu-img and files: a writer plays the virtual machine during every
attached migration and never sees an error, and every write it was told was done reads back
from the destination.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from engine import StorageEngine
from engine.errors import (
    ImageNotFound,
    NotAttached,
    ReplicationError,
    ReplicationNotReady,
    ReplicationSwitchFailed,
    StrataError,
)
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon
from tests.facade.images import MiB, run_fixes, tree_digest
from tests.hosts.hostlib import events
from tests.vm import GuestWriter, qemu_io

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed (Debian: qemu-system-common, "
    "qemu-utils)",
)

SIZE = 32 * MiB
WRITES = 4 * MiB  # the writer's range, [0, 4 MiB)
KEPT = "write -P 0x5c 16M 4M"  # written before any migration, far from the writer's range


@pytest.fixture
def engine_dir(state_dir: Callable[[], str]) -> str:
    return state_dir()


@pytest.fixture
def se(repo_paths: tuple[str, str], engine_dir: str) -> Iterator[StorageEngine]:
    """An engine on host-a connected to r1 and r2 (its daemon stopped by ``state_dir``)."""
    with StorageEngine("host-a", state_dir=engine_dir, poll_interval=0.1) as engine:
        for name, path in zip(("r1", "r2"), repo_paths, strict=True):
            engine.create_storage_repository("localfs-1.0", {"path": path})
            engine.connect_storage_repository(name, "localfs-1.0", {"path": path})
        yield engine


# --- helpers --------------------------------------------------------------------------------


def attached_disk(se: StorageEngine, user_data: Any = None) -> tuple[str, str]:
    """A disk of r1 attached on host-a, holding KEPT; its id and NBD address."""
    disk = se.create_virtual_disk("r1", SIZE, user_data=user_data)
    se.wait_for_image("r1", disk, timeout=30)
    uri = se.attach_image("r1", disk).nbd_uri
    qemu_io(uri, "raw", KEPT)
    return disk, uri


def volume_ids(se: StorageEngine, repo: str, image: str) -> list[str]:
    return [v.volume_id for v in se.get_volume_chain(repo, image)]


def names(repo_path: str) -> list[str]:
    """The events of a repository's log, by name, in order."""
    return [name for name, _, _ in events(repo_path)]


def volume_files(repo_path: str) -> set[str]:
    return set(os.listdir(os.path.join(repo_path, "volumes")))


def served(se: StorageEngine) -> list[tuple[str, str, str]]:
    return [(a.image_id, a.repo_id, a.nbd_uri) for a in se.list_attachments()]


def open_under(engine_dir: str, repo_path: str) -> list[str]:
    """The files under ``repo_path`` that the daemon of ``engine_dir`` has open."""
    pid = StorageDaemon(engine_dir).pid
    assert pid is not None
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith(repo_path + os.sep):
            found.append(target)
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        time.sleep(0.05)


def clean(se: StorageEngine, repo: str, repo_path: str, keep: set[str]) -> None:
    """Run the check's clean fixes on ``repo`` until only ``keep`` is left in its volumes (a
    clean runs on the removed image it frees, which nobody can wait for by its id)."""
    assert run_fixes(se, repo, "clean") >= 1
    wait_until(lambda: volume_files(repo_path) == keep)


def raw_copy(path: str, fmt: str, into: Path) -> str:
    """The image at ``path`` (its chain read as a whole) as a raw file: what it held then."""
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(into)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return str(into)


@contextmanager
def changes_nothing(*repo_paths: str, copying: bool = False) -> Iterator[None]:
    """No log gains an event and no file of the repositories changes; while a virtual machine
    writes or a mirror is ``copying``, no file is made or removed (volumes change by that)."""
    counts = [len(events(p)) for p in repo_paths]
    digest = tree_digest(*repo_paths)
    files = [volume_files(p) for p in repo_paths]
    yield
    assert [len(events(p)) for p in repo_paths] == counts
    assert [volume_files(p) for p in repo_paths] == files
    if not copying:
        assert tree_digest(*repo_paths) == digest


def refused(
    error: type[StrataError],
    vdsm_code: int,
    call: Callable[[], object],
    *repo_paths: str,
    copying: bool = False,
) -> StrataError:
    """``call`` raises ``error`` carrying seed 003's ``vdsm_code`` and changes nothing."""
    with changes_nothing(*repo_paths, copying=copying), pytest.raises(error) as caught:
        call()
    assert caught.value.vdsm_code == vdsm_code
    assert caught.value.to_dict()["vdsm_code"] == vdsm_code
    return caught.value


def finish_when_ready(se: StorageEngine, disk: str, timeout: float = 60.0) -> int:
    """disk_replicate_finish retried on ReplicationNotReady, as seed 003's manager does; the
    number of retries."""
    retries = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            se.disk_replicate_finish("r1", disk, "r2")
            return retries
        except ReplicationNotReady as e:
            assert e.vdsm_code == 40
            assert time.monotonic() < deadline, e
            retries += 1
            time.sleep(0.05)


# --- one call -------------------------------------------------------------------------------


def test_an_attached_disk_moves_in_one_call_while_the_vm_writes(
    se: StorageEngine, repo_paths: tuple[str, str], engine_dir: str
) -> None:
    r1, r2 = repo_paths
    user_data = {"vm": "web-1", "tags": [1, 2]}
    disk, uri = attached_disk(se, user_data)
    before = volume_ids(se, "r1", disk)
    with GuestWriter(uri, length=WRITES) as writer:
        writer.wait_for_writes(50)
        called = time.perf_counter()
        se.migrate_image("r1", disk, "r2")
        for again in (se.migrate_image, se.clone_image_structure):
            with pytest.raises(ReplicationError) as busy:  # one replication at a time
                again("r1", disk, "r2")
            assert busy.value.vdsm_code == 55
        status = se.wait_for_image("r2", disk, timeout=60)
        ended = time.perf_counter()
        writer.wait_for_writes(len(writer.writes) + 50)  # and it writes on, to r2
        assert status.status == "optimized", status
        assert any(called < w.sent and w.acked < ended for w in writer.writes)
        assert served(se) == [(disk, "r2", uri)]
        assert se.attach_image("r2", disk).nbd_uri == uri
        writer.verify(uri, "raw")
    assert open_under(engine_dir, r1) == []
    with pytest.raises(ImageNotFound) as gone:
        se.get_image_status("r1", disk)
    assert gone.value.vdsm_code == 13
    # The automatic snapshot was merged away: the chain is the one the disk had.
    assert volume_ids(se, "r2", disk) == before
    info = se.get_image_info("r2", disk)
    assert (info.kind, info.size, info.user_data, info.repo_id) == (
        "virtual-disk", SIZE, user_data, "r2"
    )  # fmt: skip
    assert disk not in [i.image_id for i in se.list_images("r1")]
    assert disk in [i.image_id for i in se.list_images("r2")]
    assert names(r1)[-3:] == ["ReplicationEnded", "ImageTornDown", "ImageRemoved"]
    assert "ReplicaSwitched" in names(r2)
    qemu_io(uri, "raw", KEPT.replace("write", "read"), read_only=True)
    # The source's space comes back through a clean fix on r1.
    assert volume_files(r1)
    clean(se, "r1", r1, keep=set())
    se.detach_image("r2", disk)
    top = se.prepare_image("r2", disk).path
    assert Path(top).parent == Path(r2, "volumes")
    writer.verify(top, "qcow2")
    qemu_io(top, "qcow2", KEPT.replace("write", "read"), read_only=True)


def test_a_detached_disk_on_a_snapshot_moves_as_a_copy_that_keeps_its_id(
    se: StorageEngine, repo_paths: tuple[str, str], tmp_path: Path, qemu: QemuImg
) -> None:
    r1, r2 = repo_paths
    disk = se.create_virtual_disk("r1", SIZE, user_data="kept")
    se.wait_for_image("r1", disk, timeout=30)
    qemu_io(se.prepare_image("r1", disk).path, "qcow2", "write -P 0x11 0 4M")
    se.teardown_image("r1", disk)
    snap = se.create_snapshot("r1", disk)
    se.wait_for_image("r1", snap, timeout=30)
    se.wait_for_image("r1", disk, timeout=30)
    top = se.prepare_image("r1", disk).path
    qemu_io(top, "qcow2", "write -P 0x22 2M 4M")
    se.teardown_image("r1", disk)
    before = volume_ids(se, "r1", disk)
    assert len(before) == 2
    (snap_volume,) = volume_ids(se, "r1", snap)
    held = raw_copy(top, "qcow2", tmp_path / "before.raw")

    se.migrate_image("r1", disk, "r2")
    assert se.wait_for_image("r2", disk, timeout=60).status == "optimized"

    assert volume_ids(se, "r2", disk) == before
    assert se.get_image_info("r2", disk).user_data == "kept"
    moved = se.prepare_image("r2", disk)
    assert Path(moved.path).parent == Path(r2, "volumes")
    assert qemu.compare(held, moved.path, a_fmt="raw", b_fmt="qcow2")
    assert qemu.compare(top, moved.path, a_fmt="qcow2", b_fmt="qcow2")  # until clean frees it
    se.teardown_image("r2", disk)
    with pytest.raises(ImageNotFound):
        se.get_image_status("r1", disk)
    assert disk not in [i.image_id for i in se.list_images("r1")]
    # The snapshot stays in r1, on the volume the disk read: a clean frees the disk's top only.
    clean(se, "r1", r1, keep={f"{snap_volume}.qcow2"})
    qemu_io(se.prepare_image("r1", snap).path, "qcow2", "read -P 0x11 0 4M", read_only=True)


def test_a_snapshot_moves_and_the_disk_on_it_keeps_reading_it(
    se: StorageEngine, tmp_path: Path, qemu: QemuImg
) -> None:
    disk = se.create_virtual_disk("r1", SIZE)
    se.wait_for_image("r1", disk, timeout=30)
    qemu_io(se.prepare_image("r1", disk).path, "qcow2", "write -P 0x11 0 4M")
    se.teardown_image("r1", disk)
    snap = se.create_snapshot("r1", disk)
    se.wait_for_image("r1", snap, timeout=30)
    se.wait_for_image("r1", disk, timeout=30)
    base = se.get_volume_chain("r1", snap)[-1]
    held = raw_copy(base.path, "qcow2", tmp_path / "snap.raw")

    se.migrate_image("r1", snap, "r2")
    assert se.wait_for_image("r2", snap, timeout=60).status == "optimized"

    info = se.get_image_info("r2", snap)
    assert (info.kind, info.size) == ("snapshot", SIZE)
    assert volume_ids(se, "r2", snap) == [base.volume_id]
    assert qemu.compare(held, se.prepare_image("r2", snap).path, a_fmt="raw", b_fmt="qcow2")
    with pytest.raises(ImageNotFound):
        se.get_image_status("r1", snap)
    # The disk in r1 reads the snapshot's volume there: a clean must leave it.
    run_fixes(se, "r1", "clean")
    assert volume_ids(se, "r1", disk)[0] == base.volume_id
    assert os.path.exists(base.path)
    qemu_io(se.prepare_image("r1", disk).path, "qcow2", "read -P 0x11 0 4M", read_only=True)


# --- seed 003's verbs -----------------------------------------------------------------------


def test_the_granular_flow_in_seed_003s_order(
    se: StorageEngine, repo_paths: tuple[str, str], engine_dir: str
) -> None:
    r1, r2 = repo_paths
    disk, uri = attached_disk(se)
    with GuestWriter(uri, length=WRITES) as writer:
        writer.wait_for_writes(50)
        snap = se.create_snapshot("r1", disk)  # live: the top becomes small and new
        chain = volume_ids(se, "r1", disk)
        assert len(chain) == 2
        se.clone_image_structure("r1", disk, "r2")
        se.wait_for_image("r1", disk, timeout=60)
        replica = se.get_image_status("r2", disk)
        assert replica.status == "broken" and "replica" in (replica.last_error or "")
        se.disk_replicate_start("r1", disk, "r2")
        assert any(p.endswith(f"{chain[-1]}.qcow2") for p in open_under(engine_dir, r2))
        job = se.get_block_job("r1", disk)
        assert job is not None and job.kind == "mirror", job
        se.sync_image_data("r1", disk, "r2", "INTERNAL")
        retries = finish_when_ready(se, disk)
        assert retries >= 1  # the sync had not ended when the first finish came
        assert se.wait_for_image("r2", disk, timeout=60).status == "optimized"
        writer.wait_for_writes(len(writer.writes) + 50)
        assert served(se) == [(disk, "r2", uri)]
        writer.verify(uri, "raw")
    assert open_under(engine_dir, r1) == []
    with pytest.raises(ImageNotFound):
        se.get_image_status("r1", disk)
    # No automatic merge after the granular switch: the user's snapshot's volume stays.
    assert volume_ids(se, "r2", disk) == chain
    assert se.get_image_info("r1", snap).kind == "snapshot"
    assert "ReplicaSwitched" in names(r2)
    assert "ReplicationEnded" in names(r1)
    se.detach_image("r2", disk)
    top = se.prepare_image("r2", disk).path
    assert Path(top).parent == Path(r2, "volumes")
    writer.verify(top, "qcow2")
    qemu_io(top, "qcow2", KEPT.replace("write", "read"), read_only=True)


def test_finishing_onto_the_source_aborts_and_a_new_migration_works(
    se: StorageEngine, repo_paths: tuple[str, str], engine_dir: str
) -> None:
    r1, r2 = repo_paths
    disk, uri = attached_disk(se)
    with GuestWriter(uri, length=WRITES) as writer:
        writer.wait_for_writes(50)
        se.create_snapshot("r1", disk)
        chain = volume_ids(se, "r1", disk)
        se.clone_image_structure("r1", disk, "r2")
        se.wait_for_image("r1", disk, timeout=60)
        se.disk_replicate_start("r1", disk, "r2")
        writer.wait_for_writes(len(writer.writes) + 50)
        assert open_under(engine_dir, r2)

        se.disk_replicate_finish("r1", disk, "r1")

        writer.wait_for_writes(len(writer.writes) + 50)
        assert writer.error is None
        assert open_under(engine_dir, r2) == []  # the mirror stopped, its target closed
        assert served(se) == [(disk, "r1", uri)]
        assert se.get_image_status("r1", disk).status == "optimized"
        assert volume_ids(se, "r1", disk) == chain
        with pytest.raises(ImageNotFound) as gone:
            se.get_image_status("r2", disk)
        assert gone.value.vdsm_code == 13
        assert [e for e in events(r1) if e[0] == "ReplicationEnded"][-1][2]["outcome"] == (
            "aborted"
        )
        assert names(r2)[-1] == "ImageRemoved"
        qemu_io(uri, "raw", KEPT.replace("write", "read"), read_only=True)

        se.migrate_image("r1", disk, "r2")  # over the discarded replica and its files
        assert se.wait_for_image("r2", disk, timeout=60).status == "optimized"
        assert "ReplicaRenewed" in names(r2)
        writer.wait_for_writes(len(writer.writes) + 50)
        assert served(se) == [(disk, "r2", uri)]
        writer.verify(uri, "raw")
    assert volume_ids(se, "r2", disk) == chain
    se.detach_image("r2", disk)
    writer.verify(se.prepare_image("r2", disk).path, "qcow2")


def test_a_switch_that_fails_leaves_the_disk_on_the_source(
    se: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    r1, r2 = repo_paths
    disk, uri = attached_disk(se)
    with GuestWriter(uri, length=WRITES) as writer:
        writer.wait_for_writes(50)
        se.create_snapshot("r1", disk)
        base, _ = volume_ids(se, "r1", disk)
        se.clone_image_structure("r1", disk, "r2")
        se.wait_for_image("r1", disk, timeout=60)
        se.disk_replicate_start("r1", disk, "r2")
        se.sync_image_data("r1", disk, "r2", "INTERNAL")
        se.wait_for_image("r1", disk, timeout=60)
        # The synced volume below the replica's top vanishes: the switch cannot open it.
        os.remove(os.path.join(r2, "volumes", f"{base}.qcow2"))

        with pytest.raises(ReplicationSwitchFailed) as failed:
            se.disk_replicate_finish("r1", disk, "r2")

        assert failed.value.vdsm_code == 41
        writer.wait_for_writes(len(writer.writes) + 50)
        assert writer.error is None
        assert served(se) == [(disk, "r1", uri)]
        assert se.get_image_info("r1", disk).repo_id == "r1"
        assert "ReplicaSwitched" not in names(r2)
        assert "StageFailed" in names(r1)
        # Finishing onto the source ends it; the image stays where it is.
        se.disk_replicate_finish("r1", disk, "r1")
        with pytest.raises(ImageNotFound):
            se.get_image_status("r2", disk)
        writer.wait_for_writes(len(writer.writes) + 50)
        writer.verify(uri, "raw")
        # What the discarded replica left in r2 is freed by a clean there.
        assert volume_files(r2)
        clean(se, "r2", r2, keep=set())
    se.detach_image("r1", disk)
    writer.verify(se.prepare_image("r1", disk).path, "qcow2")


# --- seed 003's errors ----------------------------------------------------------------------


def test_replication_needs_the_disk_attached_here(
    se: StorageEngine, repo_paths: tuple[str, str], engine_dir: str
) -> None:
    r1, r2 = repo_paths
    detached = se.create_virtual_disk("r1", SIZE)
    se.wait_for_image("r1", detached, timeout=30)
    refused(NotAttached, 1, lambda: se.disk_replicate_start("r1", detached, "r2"), r1, r2)
    se.clone_image_structure("r1", detached, "r2")
    se.wait_for_image("r1", detached, timeout=60)
    refused(NotAttached, 1, lambda: se.disk_replicate_start("r1", detached, "r2"), r1, r2)
    refused(NotAttached, 1, lambda: se.disk_replicate_finish("r1", detached, "r2"), r1, r2)


def test_replication_of_a_disk_attached_on_another_host_is_refused(
    se: StorageEngine, repo_paths: tuple[str, str], state_dir: Callable[[], str]
) -> None:
    r1, r2 = repo_paths
    disk, _ = attached_disk(se)
    with StorageEngine("host-b", state_dir=state_dir(), poll_interval=0.1) as other:
        for name, path in zip(("r1", "r2"), repo_paths, strict=True):
            other.connect_storage_repository(name, "localfs-1.0", {"path": path})
        refused(NotAttached, 1, lambda: other.disk_replicate_start("r1", disk, "r2"), r1, r2)
        refused(NotAttached, 1, lambda: other.migrate_image("r1", disk, "r2"), r1, r2)
        refused(NotAttached, 1, lambda: other.clone_image_structure("r1", disk, "r2"), r1, r2)


def test_replication_with_no_replica_is_refused(
    se: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    r1, r2 = repo_paths
    disk, _ = attached_disk(se)
    refused(ImageNotFound, 13, lambda: se.disk_replicate_start("r1", disk, "r2"), r1, r2)
    refused(ImageNotFound, 13, lambda: se.sync_image_data("r1", disk, "r2", "INTERNAL"), r1, r2)
    refused(ImageNotFound, 13, lambda: se.disk_replicate_finish("r1", disk, "r2"), r1, r2)


def test_finishing_before_the_volumes_below_are_synced_is_not_ready(
    se: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    r1, r2 = repo_paths
    disk, uri = attached_disk(se)
    se.create_snapshot("r1", disk)
    se.clone_image_structure("r1", disk, "r2")
    se.wait_for_image("r1", disk, timeout=60)
    se.disk_replicate_start("r1", disk, "r2")
    for _ in range(3):
        error = refused(
            ReplicationNotReady, 40, lambda: se.disk_replicate_finish("r1", disk, "r2"), r1, r2
        )
        assert "retry later" in str(error)
    se.sync_image_data("r1", disk, "r2", "INTERNAL")
    se.wait_for_image("r1", disk, timeout=60)
    assert finish_when_ready(se, disk) >= 0
    assert se.wait_for_image("r2", disk, timeout=60).status == "optimized"
    assert served(se) == [(disk, "r2", uri)]


def test_a_second_replication_or_none_to_finish_is_a_replication_error(
    se: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    r1, r2 = repo_paths
    disk, _ = attached_disk(se)
    refused(ReplicationError, 55, lambda: se.disk_replicate_finish("r1", disk, "r1"), r1, r2)
    se.clone_image_structure("r1", disk, "r2")
    se.wait_for_image("r1", disk, timeout=60)
    for call in (
        lambda: se.clone_image_structure("r1", disk, "r2"),
        lambda: se.migrate_image("r1", disk, "r2"),
        lambda: se.disk_replicate_finish("r1", disk, "r2"),  # no mirror runs
    ):
        refused(ReplicationError, 55, call, r1, r2)
    se.disk_replicate_start("r1", disk, "r2")
    refused(
        ReplicationError,
        55,
        lambda: se.disk_replicate_start("r1", disk, "r2"),
        r1,
        r2,
        copying=True,  # the first mirror may still be copying the top into the replica's
    )
    se.disk_replicate_finish("r1", disk, "r1")


def test_a_migration_into_a_repository_holding_an_image_of_that_id_is_refused(
    se: StorageEngine, repo_paths: tuple[str, str], tmp_path: Path
) -> None:
    """A repository restored from a copy of r1 holds r1's images under their ids."""
    r1, r2 = repo_paths
    disk = se.create_virtual_disk("r1", SIZE)
    se.wait_for_image("r1", disk, timeout=30)
    r3 = str(tmp_path / "repo3")
    shutil.copytree(r1, r3, symlinks=True)
    se.connect_storage_repository("r3", "localfs-1.0", {"path": r3})
    assert disk in [i.image_id for i in se.list_images("r3")]
    refused(ReplicationError, 55, lambda: se.migrate_image("r1", disk, "r3"), r1, r2, r3)
    refused(ReplicationError, 55, lambda: se.clone_image_structure("r1", disk, "r3"), r1, r2, r3)
