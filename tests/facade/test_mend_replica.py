"""A snapshot whose volume rotted or went missing is mended from its copy in another repository,
byte-identical afterwards, the disk above it too; without a replica, the fix says so and offers
the choices (docs/adr/0034). Real repositories, real qemu-img, one engine connected to three."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.aggregates.image import Image
from engine.errors import ImageNotFound, InvalidParameter, RepositoryNotConnected, StaleFix
from engine.formats.qemu.image_tools import QemuImg
from engine.types import Fix
from tests.digest_records import record_file_digest
from tests.facade.images import MiB, tree_digest, write

SIZE = 8 * MiB
REPOS = ("r1", "r2", "r3")


@pytest.fixture
def roots(tmp_path: Path) -> tuple[str, ...]:
    paths = tuple(str(tmp_path / name) for name in REPOS)
    for p in paths:
        os.mkdir(p)
    return paths


@pytest.fixture
def se(tmp_path: Path, roots: tuple[str, ...]) -> Iterator[StorageEngine]:
    with StorageEngine("host-a", state_dir=str(tmp_path / "state"), poll_interval=0.1) as engine:
        for name, path in zip(REPOS, roots, strict=True):
            engine.create_storage_repository("localfs-1.0", {"path": path})
            engine.connect_storage_repository(name, "localfs-1.0", {"path": path})
        yield engine


# --- helpers ------------------------------------------------------------------------------------


def image(se: StorageEngine, repo: str, image_id: str) -> Image:
    connected = se._repos[repo]
    connected.follower.caught_up()
    found = connected.view.image(image_id)
    assert found is not None
    return found


def top_path(se: StorageEngine, repo: str, image_id: str) -> tuple[str, str]:
    top = se.get_volume_chain(repo, image_id)[-1]
    return top.path, top.format


def digest(se: StorageEngine, repo: str, image_id: str) -> str:
    """The digest recorded for the image's top; recorded here first if no stage did yet."""
    found = image(se, repo, image_id)
    ref = found.chain[-1]
    if ref not in found.digests:
        path, _ = top_path(se, repo, image_id)
        record_file_digest(se._repos[repo].service, found.id, ref, path, se.host_id)
        found = image(se, repo, image_id)
    return found.digests[ref]["digest"]


def record_rot(se: StorageEngine, repo: str, image_id: str, ranges: list[list[int]]) -> None:
    """What the deep check records for rot it finds (docs/adr/0033), without reading."""
    connected = se._repos[repo]
    found = image(se, repo, image_id)
    connected.service.update(
        found.id,
        lambda i: i.record_damage(
            volume=found.chain[-1],
            ranges=ranges,
            detail="sha256 of the chunk differs from the one recorded",
            host_id=se.host_id,
            now=connected.service.now(),
        ),
    )


def flip_a_data_byte(qemu: QemuImg, path: str, fmt: str) -> int:
    """Flip one byte of data the volume itself holds; its guest offset."""
    extent = next(e for e in qemu.map(path, fmt=fmt) if e["data"] and e["depth"] == 0)
    host = extent["offset"] + 4096 + 7
    with open(path, "r+b") as f:
        f.seek(host)
        byte = f.read(1)
        f.seek(host)
        f.write(bytes([byte[0] ^ 0xFF]))
    return int(extent["start"]) + 4096 + 7


def export(se: StorageEngine, repo: str, image_id: str, to: str) -> str:
    path, fmt = top_path(se, repo, image_id)
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, to], check=True)
    return to


def reads_as(se: StorageEngine, qemu: QemuImg, repo: str, image_id: str, raw: str) -> bool:
    path, fmt = top_path(se, repo, image_id)
    return qemu.compare(path, raw, a_fmt=fmt, b_fmt="raw")


def mends(se: StorageEngine, repo: str = "r1", **options: object) -> list[Fix]:
    fixes = se.check_storage_repository(repo, options or None)
    return [f for f in fixes if f.type == "mend"]


def settle(se: StorageEngine, repo: str, *images: str) -> None:
    for i in images:
        assert se.wait_for_image(repo, i, timeout=60).status == "optimized"


def family(se: StorageEngine, qemu: QemuImg, snapshots: int = 1) -> tuple[str, str]:
    """A disk with data in r1 and its last of ``snapshots`` snapshots, copied to r2 (same
    id); the disk written again after."""
    disk = se.create_virtual_disk("r1", SIZE)
    se.wait_for_image("r1", disk, timeout=60)
    for n in range(snapshots):
        write(se, qemu, "r1", disk, n * 2 * MiB, MiB, 0x11 + n)
        snap = se.create_snapshot("r1", disk)
        settle(se, "r1", snap, disk)
    write(se, qemu, "r1", disk, 7 * MiB, MiB, 0x77)
    assert se.copy_image("r2", snap) == snap
    settle(se, "r2", snap)
    return snap, disk


# --- mends from a replica -----------------------------------------------------------------------


def test_a_flipped_byte_in_a_snapshot_is_mended_from_its_replica_byte_identical(
    se: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    snap, disk = family(se, qemu)
    assert digest(se, "r1", snap) == digest(se, "r2", snap)  # the same bytes, two repositories
    before = {i: export(se, "r1", i, str(tmp_path / f"{i}.raw")) for i in (snap, disk)}
    path, fmt = top_path(se, "r1", snap)
    offset = flip_a_data_byte(qemu, path, fmt)
    assert not reads_as(se, qemu, "r1", snap, before[snap])

    (mend,) = [f for f in se.check_storage_repository("r1", {"deep": True}) if f.type == "mend"]

    (found,) = image(se, "r1", snap).damage.values()
    assert found["ranges"] == [[offset & ~(MiB - 1), (offset & ~(MiB - 1)) + MiB]]
    assert se.get_image_status("r1", disk).status == "broken"
    assert mend.image_ids == (snap, disk)
    assert "is rotten; copy it again from its replica in repository r2 (digest " in (
        mend.description
    )
    assert digest(se, "r1", snap)[:12] in mend.description
    se.fix_storage_repository("r1", mend)
    settle(se, "r1", snap, disk)
    for i in (snap, disk):
        assert reads_as(se, qemu, "r1", i, before[i]), i
    assert image(se, "r1", snap).damage == {}
    assert mends(se) == []


def test_a_deleted_overlay_of_a_snapshot_is_made_again_over_its_base(
    se: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    snap, disk = family(se, qemu, snapshots=2)
    assert digest(se, "r1", snap) == digest(se, "r2", snap)
    before = {i: export(se, "r1", i, str(tmp_path / f"{i}.raw")) for i in (snap, disk)}
    chain = se.get_volume_chain("r1", snap)
    os.unlink(chain[-1].path)
    assert se.get_image_status("r1", disk).status == "broken"

    (mend,) = mends(se)

    assert "is missing; copy it again from its replica in repository r2" in mend.description
    se.fix_storage_repository("r1", mend)
    settle(se, "r1", snap, disk)
    for i in (snap, disk):
        assert reads_as(se, qemu, "r1", i, before[i]), i
    # The structure stays: an overlay on the same base, holding only what differs.
    info = qemu.info(chain[-1].path, fmt="qcow2")
    assert os.path.basename(info["backing-filename"]) == os.path.basename(chain[0].path)
    assert os.path.getsize(chain[-1].path) < SIZE


def test_a_replica_whose_digest_differs_is_not_used_and_participating_restricts_the_search(
    se: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    snap, disk = family(se, qemu)
    assert se.copy_image("r3", snap) == snap
    settle(se, "r3", snap)
    good = digest(se, "r1", snap)
    assert digest(se, "r3", snap) == good
    # r2's copy was written over since: its digest is another.
    connected = se._repos["r2"]
    r2_snap = image(se, "r2", snap)
    digest(se, "r2", snap)
    connected.service.update(
        r2_snap.id,
        lambda i: i.record_digest(
            volume=r2_snap.chain[-1],
            size=SIZE,
            chunk_size=MiB,
            chunks=b"",
            digest="00" * 32,
            host_id=se.host_id,
            now=connected.service.now(),
        ),
    )
    before = export(se, "r1", disk, str(tmp_path / "disk.raw"))
    os.unlink(se.get_volume_chain("r1", snap)[-1].path)

    (mend,) = mends(se)
    assert "from its replica in repository r3" in mend.description
    only_r2 = mends(se, participating_repositories=["r2"])
    assert len(only_r2) == 2
    assert all(
        "no replica in any participating repository (looked in r2)" in f.description
        for f in only_r2
    )

    # The fix made with r3 in sight, started looking in r2 only: refused, nothing written.
    logs = tree_digest(*(se._repos[r].storage.root for r in REPOS))
    with pytest.raises(StaleFix):
        se.fix_storage_repository("r1", mend, {"participating_repositories": ["r2"]})
    assert tree_digest(*(se._repos[r].storage.root for r in REPOS)) == logs

    se.fix_storage_repository("r1", mend, {"participating_repositories": ["r3"]})
    settle(se, "r1", snap, disk)
    assert reads_as(se, qemu, "r1", disk, before)


def test_a_mend_whose_replica_was_removed_since_the_check_is_refused(
    se: StorageEngine, qemu: QemuImg
) -> None:
    snap, _ = family(se, qemu)
    digest(se, "r1", snap), digest(se, "r2", snap)
    os.unlink(se.get_volume_chain("r1", snap)[-1].path)
    (mend,) = mends(se)
    se.remove_image("r2", snap)
    roots = [se._repos[r].storage.root for r in REPOS]
    logs = tree_digest(*roots)

    with pytest.raises(StaleFix, match="gone"):
        se.fix_storage_repository("r1", mend)

    assert tree_digest(*roots) == logs


def test_a_replica_found_rotten_in_its_own_repository_is_not_used(
    se: StorageEngine, qemu: QemuImg
) -> None:
    snap, _ = family(se, qemu)
    assert digest(se, "r1", snap) == digest(se, "r2", snap)
    record_rot(se, "r2", snap, [[0, MiB]])
    os.unlink(se.get_volume_chain("r1", snap)[-1].path)

    fixes = mends(se)

    assert len(fixes) == 2
    assert all("no replica in any connected repository" in f.description for f in fixes)


# --- without a replica --------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["remove", "accept"])
def test_without_a_replica_the_fix_says_so_and_both_choices_work(
    se: StorageEngine, qemu: QemuImg, tmp_path: Path, choice: str
) -> None:
    snap, disk = family(se, qemu)
    digest(se, "r1", snap)
    se.remove_image("r2", snap)
    path, fmt = top_path(se, "r1", snap)
    offset = flip_a_data_byte(qemu, path, fmt)
    start = offset & ~(MiB - 1)

    fixes = [f for f in se.check_storage_repository("r1", {"deep": True}) if f.type == "mend"]

    assert len(fixes) == 2, fixes
    said = (
        f"mend snapshot {snap}: volume {image(se, 'r1', snap).chain[-1]} is rotten at bytes "
        f"{start}-{start + MiB}; no replica in any connected repository (looked in r2, r3): "
    )
    (remove,) = [f for f in fixes if f.description.startswith(said + "remove the image")]
    (accept,) = [f for f in fixes if f.description.startswith(said + "accept the loss")]
    if choice == "remove":
        se.fix_storage_repository("r1", remove)
        se.fix_storage_repository("r1", remove)  # idempotent
        with pytest.raises(ImageNotFound):
            se.get_image_status("r1", snap)
        return
    se.fix_storage_repository("r1", accept)
    se.fix_storage_repository("r1", accept)  # idempotent
    settle(se, "r1", snap, disk)
    # Zeroes where the snapshot's volume held data; the disk's own writes are still there.
    assert qemu.read_pattern_matches(path, fmt, start, MiB, 0)
    disk_path, disk_fmt = top_path(se, "r1", disk)
    assert qemu.read_pattern_matches(disk_path, disk_fmt, 0, MiB, 0)
    assert qemu.read_pattern_matches(disk_path, disk_fmt, 7 * MiB, MiB, 0x77)
    assert image(se, "r1", snap).damage == {}
    assert mends(se) == []


# --- options --------------------------------------------------------------------------------------


def test_participating_repositories_must_name_connected_repositories(se: StorageEngine) -> None:
    nothing: list[str] = []
    for value in (nothing, "r2"):
        bad: dict[str, object] = {"participating_repositories": value}
        with pytest.raises(InvalidParameter, match="participating_repositories"):
            se.check_storage_repository("r1", bad)
    with pytest.raises(InvalidParameter, match="unknown keys"):
        se.check_storage_repository("r1", {"participating": ["r2"]})
    with pytest.raises(RepositoryNotConnected):
        se.check_storage_repository("r1", {"participating_repositories": ["r9"]})
    assert se.check_storage_repository("r1", {"participating_repositories": ["r1", "r2"]}) == []
