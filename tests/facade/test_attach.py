"""Attached images, for real (docs/adr/0027): the host's storage daemon serves an image over NBD,
``qemu-io`` plays the virtual machine, and what it wrote is in the image's volume after detach.

Each test's engines use short state dirs (a Unix socket's path has 108 bytes) and each daemon is
stopped after its engine closed, even when the test failed.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from engine import Attachment, StorageEngine
from engine.errors import ImageInUse, ImageNotFound, InvalidParameter, StrataError
from engine.formats.qemu.storage_daemon import StorageDaemon
from tests.facade.images import Engines, MiB, prepared, tree_digest
from tests.vm import qemu_io

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed (Debian: qemu-system-common, "
    "qemu-utils)",
)


@pytest.fixture
def engine_a(engines: Engines) -> StorageEngine:
    return engines("host-a")


def optimized_disk(se: StorageEngine) -> str:
    disk = se.create_virtual_disk("r1", 4 * MiB)
    se.wait_for_image("r1", disk, timeout=30)
    return disk


def test_writes_through_the_export_land_in_the_image(engine_a: StorageEngine) -> None:
    disk = optimized_disk(engine_a)
    attached = engine_a.attach_image("r1", disk)
    assert attached == Attachment(disk, "r1", attached.nbd_uri, readonly=False)
    assert attached.nbd_uri.startswith("nbd+unix:///")
    qemu_io(attached.nbd_uri, "raw", "write -P 0x5a 0 1M")
    qemu_io(attached.nbd_uri, "raw", "read -P 0x5a 0 1M", read_only=True)
    engine_a.detach_image("r1", disk)
    with prepared(engine_a, "r1", disk) as p:
        qemu_io(p.path, p.format, "read -P 0x5a 0 1M", read_only=True)


def test_attaching_twice_returns_the_same_and_the_list_follows(engine_a: StorageEngine) -> None:
    disk = optimized_disk(engine_a)
    first = engine_a.attach_image("r1", disk)
    assert engine_a.attach_image("r1", disk) == first
    assert engine_a.list_attachments() == [first]
    assert first.to_dict() == {
        "image_id": disk,
        "repo_id": "r1",
        "nbd_uri": first.nbd_uri,
        "readonly": False,
    }
    engine_a.detach_image("r1", disk)
    assert engine_a.list_attachments() == []


def test_a_snapshot_is_served_read_only(engine_a: StorageEngine) -> None:
    disk = optimized_disk(engine_a)
    snap = engine_a.create_snapshot("r1", disk)
    engine_a.wait_for_image("r1", snap, timeout=30)
    attached = engine_a.attach_image("r1", snap)
    assert attached.readonly
    qemu_io(attached.nbd_uri, "raw", "read -P 0 0 1M", read_only=True)
    with pytest.raises(subprocess.CalledProcessError):
        qemu_io(attached.nbd_uri, "raw", "write -P 0x5a 0 1M")
    engine_a.detach_image("r1", snap)


def test_an_image_attached_on_another_host_is_in_use(engines: Engines) -> None:
    engine_a = engines("host-a")
    disk = optimized_disk(engine_a)
    engine_a.attach_image("r1", disk)
    engine_b = engines("host-b")
    with pytest.raises(ImageInUse):
        engine_b.attach_image("r1", disk)
    assert engine_b.list_attachments() == []
    engine_a.detach_image("r1", disk)
    assert engine_b.attach_image("r1", disk).readonly is False
    engine_b.detach_image("r1", disk)


def test_listing_and_bad_ids_start_no_daemon(engine_a: StorageEngine) -> None:
    assert engine_a.list_attachments() == []
    with pytest.raises(ImageNotFound):
        engine_a.detach_image("r1", str(uuid.uuid4()))
    assert StorageDaemon(engine_a.config.state_dir).pid is None


def test_the_daemon_outlives_the_engine(engines: Engines) -> None:
    engine_a = engines("host-a")
    disk = optimized_disk(engine_a)
    attached = engine_a.attach_image("r1", disk)
    engine_a.close()
    qemu_io(attached.nbd_uri, "raw", "write -P 0x33 0 64k")


@pytest.mark.parametrize(
    ("image_id", "error"),
    [("not-a-uuid", InvalidParameter), (str(uuid.uuid4()), ImageNotFound)],
)
def test_bad_ids_append_nothing(
    engine_a: StorageEngine, repo_paths: tuple[str, str], image_id: str, error: type[StrataError]
) -> None:
    optimized_disk(engine_a)
    before = tree_digest(repo_paths[0])
    for call in (engine_a.attach_image, engine_a.detach_image):
        with pytest.raises(error):
            call("r1", image_id)
    assert tree_digest(repo_paths[0]) == before
