"""A migration's replica (docs/adr/0029) and a migrated-away source, across the storage API:
the replica is no image yet (broken, saying which migration fills it; listed, counted, looked up,
prepared, attached, copied and based on by nobody), its files are no check's to mend or clean,
and the source's copy, once migrated away, is cleaned like any removed image's."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator

import pytest

from engine import Attachment, StorageEngine
from engine.errors import ImageNotFound, ImageNotReady
from engine.formats.qemu.image_tools import QemuImg
from tests.facade.images import holds, run_fixes, write
from tests.vm import qemu_io

MiB = 2**20
Open = Callable[..., StorageEngine]


@pytest.fixture
def open_engine(repo_paths: tuple[str, str], state_dir: Callable[[], str]) -> Iterator[Open]:
    """``open_engine(host_id, order=("r1", "r2"), **kwargs)``: an engine connected to both
    repositories (formatted by the first), in that order; each closed at the end."""
    opened: list[StorageEngine] = []
    paths = dict(zip(("r1", "r2"), repo_paths, strict=True))

    def make(
        host_id: str, order: tuple[str, ...] = ("r1", "r2"), **kwargs: object
    ) -> StorageEngine:
        kwargs.setdefault("poll_interval", 0.1)
        se = StorageEngine(host_id, state_dir=state_dir(), **kwargs)  # type: ignore[arg-type]
        opened.append(se)
        for name in order:
            if len(opened) == 1:
                se.create_storage_repository("localfs-1.0", {"path": paths[name]})
            se.connect_storage_repository(name, "localfs-1.0", {"path": paths[name]})
        return se

    try:
        yield make
    finally:
        for se in opened:
            se.close()


@pytest.fixture
def engine(open_engine: Open) -> StorageEngine:
    return open_engine("host-a")


def volumes(engine: StorageEngine, repo: str) -> list[str]:
    path = os.path.join(engine.describe_repository(repo)["path"], "volumes")
    return sorted(os.listdir(path))


def disk_with_snapshot(engine: StorageEngine, qemu: QemuImg) -> tuple[str, str]:
    """A disk holding 0x5A in its first MiB under a snapshot, and 0x5B in its second above."""
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    write(engine, qemu, "r1", disk, 0, MiB, 0x5A)
    snap = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.wait_for_image("r1", snap, timeout=30)  # its digest: a migration waits for work
    write(engine, qemu, "r1", disk, MiB, MiB, 0x5B)
    return disk, snap


def cloned(engine: StorageEngine, image: str) -> str:
    """The image's structure cloned, empty, into r2: a replica that stays one (no sync, no
    switch)."""
    op = engine.clone_image_structure("r1", image, "r2")
    engine.wait_for_image("r1", image, timeout=30)  # the clone, an operation of the source
    return op


def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- what the storage API says of a replica -------------------------------------------------


def test_a_replica_is_broken_and_names_the_migration_that_fills_it(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)
    source_root = engine.describe_repository("r1")["path"]

    status = engine.get_image_status("r2", disk)

    assert status.status == "broken"
    assert status.last_error == f"a replica being filled by a migration from {source_root}"
    assert engine.get_image_status("r1", disk).status == "optimized"  # the image is the source


def test_a_replica_is_neither_listed_nor_counted_as_an_image_of_its_repository(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)

    described = engine.describe_repository("r2")

    assert engine.list_images("r2") == []
    assert (described["images"], described["virtual_disks"], described["by_status"]) == (0, 0, {})
    assert described["replicas"] == 1
    assert engine.describe_repository("r1")["replicas"] == 0


def test_the_path_of_a_replica_s_top_is_no_image(engine: StorageEngine, qemu: QemuImg) -> None:
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)
    [top] = [v for v in volumes(engine, "r2") if v == os.path.basename(
        engine.get_volume_chain("r1", disk)[-1].path
    )]  # fmt: skip
    replica_top = os.path.join(engine.describe_repository("r2")["path"], "volumes", top)

    with pytest.raises(ImageNotFound):
        engine.lookup_image_by_path(replica_top)
    source_top = engine.get_volume_chain("r1", disk)[-1].path
    assert engine.lookup_image_by_path(source_top).repo_id == "r1"


def test_a_replica_is_neither_prepared_nor_attached(engine: StorageEngine, qemu: QemuImg) -> None:
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)

    for call in (engine.prepare_image, engine.attach_image):
        with pytest.raises(ImageNotReady) as caught:
            call("r2", disk)
        assert caught.value.status == "broken" and "replica" in caught.value.message


def test_a_replica_is_never_copied_nor_a_base(engine: StorageEngine, qemu: QemuImg) -> None:
    disk, snap = disk_with_snapshot(engine, qemu)
    cloned(engine, snap)  # the snapshot's replica in r2: its volume empty
    on_the_replica = {"image_hints": {snap: "r2"}}
    before = volumes(engine, "r2")

    with pytest.raises(ImageNotReady):
        engine.copy_image("r1", snap, options=on_the_replica)
    with pytest.raises(ImageNotReady):
        engine.create_virtual_disk("r2", 8 * MiB, snap, options=on_the_replica)
    with pytest.raises(ImageNotReady):
        engine.copy_image("r2", disk, base_image_id=snap)  # an increment onto the replica
    with pytest.raises(ImageNotReady):
        engine.copy_image("r2", snap, options={"participating_repositories": ["r2"]})
    assert volumes(engine, "r2") == before

    # Found without a hint, the image is the source's, never its replica; and the replica,
    # which holds the snapshot's id in r2, is neither the copy nor the base there.
    clone = engine.create_virtual_disk("r2", 8 * MiB, snap)
    copied = engine.copy_image("r2", snap)
    engine.wait_for_image("r2", clone, timeout=30)
    engine.wait_for_image("r2", copied, timeout=30)
    assert copied != snap
    assert holds(engine, qemu, "r2", clone, 0, MiB, 0x5A)
    assert holds(engine, qemu, "r2", copied, 0, MiB, 0x5A)
    assert engine.get_image_status("r2", snap).status == "broken"  # still the replica


def test_a_copy_reads_the_source_of_a_migration_even_where_the_replica_is_seen_first(
    open_engine: Open, qemu: QemuImg
) -> None:
    """Executors look for a copy's source in every connected repository: the replica, same
    id, connected first here, is the last place they read from."""
    engine = open_engine("host-a", order=("r2", "r1"))
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)

    of_disk = engine.copy_image("r1", disk)
    engine.wait_for_image("r1", of_disk, timeout=30)

    assert holds(engine, qemu, "r1", of_disk, 0, MiB, 0x5A)
    assert holds(engine, qemu, "r1", of_disk, MiB, MiB, 0x5B)


# --- checks and fixes -----------------------------------------------------------------------


def test_a_replica_whose_files_are_not_made_yet_is_offered_no_fix(
    open_engine: Open, qemu: QemuImg
) -> None:
    worker = open_engine("host-a")
    disk, _ = disk_with_snapshot(worker, qemu)
    worker.close()
    appender = open_engine("host-b", run_executors=False)  # appends the clone, never runs it

    appender.clone_image_structure("r1", disk, "r2")

    assert volumes(appender, "r2") == []
    assert appender.check_storage_repository("r2") == []
    assert all(disk not in f.image_ids for f in appender.check_storage_repository("r1"))
    assert appender.get_image_status("r2", disk).status == "broken"


def test_a_replica_s_files_are_never_cleaned_nor_mended_when_one_is_missing(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)
    made = volumes(engine, "r2")
    os.unlink(os.path.join(engine.describe_repository("r2")["path"], "volumes", made[1]))

    assert engine.check_storage_repository("r2") == []  # its sync makes it: expected
    assert volumes(engine, "r2") == made[:1]


def test_a_migration_s_temporary_file_in_the_destination_is_cleaned_once_its_source_says_so(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    """Whether an attempt of the source's operation still writes the file is the source's log
    to say: unknown while the source is not connected, a leftover once the operation is
    over (its attempts are tagged ``<operation>-<stage>-e<epoch>``)."""
    disk, _ = disk_with_snapshot(engine, qemu)
    op = cloned(engine, disk)  # over, once the clone is made
    made = volumes(engine, "r2")
    r2 = engine.describe_repository("r2")["path"]
    temporary = os.path.join(r2, "volumes", f".tmp-{made[0]}.{op}-0-e1")
    with open(temporary, "wb") as f:
        f.write(b"what a killed attempt left")
    r1 = engine.describe_repository("r1")["path"]

    engine.disconnect_storage_repository("r1")
    assert engine.check_storage_repository("r2") == []
    engine.connect_storage_repository("r1", "localfs-1.0", {"path": r1})

    [clean] = engine.check_storage_repository("r2")
    assert (clean.type, clean.image_ids) == ("clean", ())
    assert "1 temporary file(s)" in clean.description
    run_fixes(engine, "r2", "clean")
    until(lambda: not os.path.exists(temporary))
    assert volumes(engine, "r2") == made  # the replica's own files stay
    assert engine.check_storage_repository("r2") == []


def test_an_aborted_replica_s_files_are_cleaned_and_the_migration_can_start_again(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk, _ = disk_with_snapshot(engine, qemu)
    cloned(engine, disk)
    engine.disk_replicate_finish("r1", disk, "r1")  # onto the source: abort
    with pytest.raises(ImageNotFound):
        engine.get_image_status("r2", disk)

    assert run_fixes(engine, "r2", "clean") == 1
    until(lambda: volumes(engine, "r2") == [])

    engine.migrate_image("r1", disk, "r2")
    assert engine.wait_for_image("r2", disk, timeout=60).status == "optimized"
    assert holds(engine, qemu, "r2", disk, 0, MiB, 0x5A)
    assert holds(engine, qemu, "r2", disk, MiB, MiB, 0x5B)


def test_a_source_migrated_away_is_cleaned_once_nothing_needs_it(
    engine: StorageEngine, qemu: QemuImg
) -> None:
    disk, snap = disk_with_snapshot(engine, qemu)
    [snapshot_volume] = [os.path.basename(v.path) for v in engine.get_volume_chain("r1", snap)]

    engine.migrate_image("r1", disk, "r2")
    assert engine.wait_for_image("r2", disk, timeout=60).status == "optimized"
    with pytest.raises(ImageNotFound):
        engine.get_image_status("r1", disk)

    [clean] = engine.check_storage_repository("r1")
    assert (clean.type, clean.image_ids) == ("clean", (disk,))
    run_fixes(engine, "r1", "clean")
    # The disk's own top goes; the volume below it is the snapshot's, which stays in r1.
    until(lambda: volumes(engine, "r1") == [snapshot_volume])
    assert engine.check_storage_repository("r1") == []
    assert engine.check_storage_repository("r2") == []
    assert holds(engine, qemu, "r1", snap, 0, MiB, 0x5A)
    assert holds(engine, qemu, "r2", disk, 0, MiB, 0x5A)
    assert holds(engine, qemu, "r2", disk, MiB, MiB, 0x5B)


# --- attached images ------------------------------------------------------------------------

needs_daemon = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed",
)


@needs_daemon
def test_the_attachment_of_an_image_being_migrated_is_the_source_s_then_the_destination_s(
    engine: StorageEngine,
) -> None:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    engine.wait_for_image("r1", disk, timeout=30)
    attached = engine.attach_image("r1", disk)
    qemu_io(attached.nbd_uri, "raw", "write -P 0x5c 0 1M")
    cloned(engine, disk)

    assert engine.list_attachments() == [attached]  # never the replica's as well
    engine.disk_replicate_finish("r1", disk, "r1")  # abort: the image stays where it is
    assert engine.list_attachments() == [attached]

    run_fixes(engine, "r2", "clean")
    until(lambda: volumes(engine, "r2") == [])
    engine.migrate_image("r1", disk, "r2")
    engine.wait_for_image("r2", disk, timeout=120)

    moved = Attachment(disk, "r2", attached.nbd_uri, readonly=False)
    assert engine.list_attachments() == [moved]
    qemu_io(attached.nbd_uri, "raw", "read -P 0x5c 0 1M", read_only=True)
    engine.detach_image("r2", disk)
