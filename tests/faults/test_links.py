"""Nothing outside the repository is touched (architecture §6): a symbolic link or a hard link
inside a repository is reported by the check as a foreign file, and never written, cleaned,
copied or read through. Every test puts real links in real repositories and asserts that the
files they lead to keep their bytes and their existence."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import ForeignFile
from engine.formats.qemu.image_tools import QemuImg
from engine.types import Fix

MiB = 2**20


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[StorageEngine]:
    """Two connected repositories, r1 and r2, under tmp_path."""
    with StorageEngine("host-a", state_dir=str(tmp_path / "state"), poll_interval=0.1) as se:
        for name in ("r1", "r2"):
            path = tmp_path / name
            path.mkdir()
            se.create_storage_repository("localfs-1.0", {"path": str(path)})
            se.connect_storage_repository(name, "localfs-1.0", {"path": str(path)})
        yield se


def fingerprint(*paths: str | Path) -> dict[str, str | None]:
    """Each path's bytes (a digest), or None where nothing is: what must not change."""
    found: dict[str, str | None] = {}
    for path in paths:
        if not os.path.lexists(path):
            found[str(path)] = None
        elif os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                found.update(fingerprint(os.path.join(path, name)))
        else:
            with open(path, "rb") as f:
                found[str(path)] = hashlib.sha256(f.read()).hexdigest()
    return found


def volume_of(tmp_path: Path, repo: str) -> Path:
    (name,) = [n for n in os.listdir(tmp_path / repo / "volumes") if not n.startswith(".")]
    return tmp_path / repo / "volumes" / name


def foreign_reports(fixes: list[Fix]) -> list[Fix]:
    return [f for f in fixes if f.description.startswith("foreign file ")]


def new_disk(engine: StorageEngine, qemu: QemuImg, repo: str, pattern: int) -> str:
    disk = engine.create_virtual_disk(repo, 8 * MiB)
    assert engine.wait_for_image(repo, disk, timeout=30).status == "optimized"
    prepared = engine.prepare_image(repo, disk)
    qemu.write_pattern(prepared.path, prepared.format, 0, MiB, pattern)
    engine.teardown_image(repo, disk)
    return disk


# --- the volume directory -------------------------------------------------------------------


def test_a_volume_directory_linked_to_another_repositorys_is_reported_and_nothing_is_cleaned(
    engine: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    mine = new_disk(engine, qemu, "r1", 0x11)
    theirs = new_disk(engine, qemu, "r2", 0x22)
    other_volumes = tmp_path / "r2" / "volumes"
    shutil.rmtree(tmp_path / "r1" / "volumes")
    os.symlink(other_volumes, tmp_path / "r1" / "volumes")
    before = fingerprint(other_volumes)

    fixes = engine.check_storage_repository("r1")

    assert [f.type for f in fixes] == ["mend"]  # no clean of r2's live volume, seen as an orphan
    (report,) = foreign_reports(fixes)
    assert "volumes" in report.description and "symbolic link" in report.description
    assert engine.get_image_status("r1", mine).status == "broken"  # its volume is out of reach
    with pytest.raises(ForeignFile) as refused:
        engine.fix_storage_repository("r1", report)
    assert refused.value.code == "foreign_file"
    assert fingerprint(other_volumes) == before
    assert engine.get_image_status("r2", theirs).status == "optimized"


def test_work_in_a_repository_whose_volume_directory_is_a_link_fails_and_writes_nothing_there(
    engine: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    disk = new_disk(engine, qemu, "r1", 0x11)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "r1" / "volumes", elsewhere)  # the same names, outside
    shutil.rmtree(tmp_path / "r1" / "volumes")
    os.symlink(elsewhere, tmp_path / "r1" / "volumes")
    before = fingerprint(elsewhere)

    engine.resize_virtual_disk("r1", disk, 16 * MiB)
    status = engine.wait_for_image("r1", disk, timeout=30)
    new = engine.create_virtual_disk("r1", 8 * MiB)
    new_status = engine.wait_for_image("r1", new, timeout=30)
    engine.remove_image("r1", disk)

    for st in (status, new_status):
        assert st.status == "broken"
        assert st.last_error is not None and "symbolic link" in st.last_error
    assert not any(f.type == "clean" for f in engine.check_storage_repository("r1"))
    assert fingerprint(elsewhere) == before


# --- a volume that is a link to a file outside ----------------------------------------------


def symlink_to(outside: Path, volume: Path) -> None:
    os.unlink(volume)
    os.symlink(outside, volume)


def hard_link_to(outside: Path, volume: Path) -> None:
    os.unlink(volume)
    os.link(outside, volume)


LINKS = [
    pytest.param((symlink_to, "symbolic link"), id="symlink"),
    pytest.param((hard_link_to, "hard link"), id="hard-link"),
]


@pytest.fixture
def linked_disk(
    engine: StorageEngine, qemu: QemuImg, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[str, Path, str]:
    """A disk of r1 whose volume was replaced by a link to an image outside the repository
    (a copy of the volume: what qemu-img would happily resize, copy or write if it got it)."""
    make_link, what = request.param
    disk = new_disk(engine, qemu, "r1", 0x11)
    volume = volume_of(tmp_path, "r1")
    outside = tmp_path / "outside" / volume.name
    outside.parent.mkdir()
    shutil.copyfile(volume, outside)
    qemu.write_pattern(str(outside), volume.suffix[1:], 0, MiB, 0x99)  # not the disk's data
    (tmp_path / "outside" / "sentinel").write_bytes(b"keep me")
    make_link(outside, volume)
    return disk, outside, what


def assert_outside_unchanged(tmp_path: Path, before: dict[str, str | None]) -> None:
    assert fingerprint(tmp_path / "outside") == before
    assert all(digest is not None for digest in before.values())


def assert_broken_by(engine: StorageEngine, repo: str, image: str, what: str) -> None:
    """The image's work stops on the link: broken, its last error naming what was found."""
    status = engine.wait_for_image(repo, image, timeout=30)
    assert status.status == "broken"
    assert status.last_error is not None and what in status.last_error


@pytest.mark.parametrize("linked_disk", LINKS, indirect=True)
def test_a_linked_volume_is_never_resized(
    engine: StorageEngine, tmp_path: Path, linked_disk: tuple[str, Path, str], qemu: QemuImg
) -> None:
    disk, outside, what = linked_disk
    before = fingerprint(tmp_path / "outside")
    engine.resize_virtual_disk("r1", disk, 16 * MiB)
    assert_broken_by(engine, "r1", disk, what)
    assert qemu.info(str(outside), fmt=outside.suffix[1:])["virtual-size"] == 8 * MiB
    assert_outside_unchanged(tmp_path, before)


@pytest.mark.parametrize("linked_disk", LINKS, indirect=True)
def test_a_linked_volume_is_never_copied_from(
    engine: StorageEngine, tmp_path: Path, linked_disk: tuple[str, Path, str]
) -> None:
    disk, _, what = linked_disk
    before = fingerprint(tmp_path / "outside")
    copy = engine.copy_image("r2", disk)
    assert_broken_by(engine, "r2", copy, what)
    assert [n for n in os.listdir(tmp_path / "r2" / "volumes")] == []  # nothing copied over
    assert_outside_unchanged(tmp_path, before)


@pytest.mark.parametrize("linked_disk", LINKS, indirect=True)
def test_a_linked_volume_is_never_built_on_by_a_snapshot(
    engine: StorageEngine, tmp_path: Path, linked_disk: tuple[str, Path, str]
) -> None:
    disk, _, what = linked_disk
    before = fingerprint(tmp_path / "outside")
    engine.create_snapshot("r1", disk)
    assert_broken_by(engine, "r1", disk, what)
    assert_outside_unchanged(tmp_path, before)


@pytest.mark.parametrize("linked_disk", LINKS, indirect=True)
def test_a_linked_volume_is_never_given_to_a_virtual_machine(
    engine: StorageEngine, tmp_path: Path, linked_disk: tuple[str, Path, str]
) -> None:
    disk, outside, what = linked_disk
    with pytest.raises(ForeignFile) as refused:
        engine.prepare_image("r1", disk)
    assert what in refused.value.message
    status = engine.get_image_status("r1", disk)
    assert status.status == "broken" and "foreign file" in (status.last_error or "")
    with pytest.raises(Exception):  # noqa: B017  (any refusal: the path is not the image's)
        engine.lookup_image_by_path(str(outside))


@pytest.mark.parametrize("linked_disk", LINKS, indirect=True)
def test_the_check_reports_a_linked_volume_and_no_fix_goes_through_it(
    engine: StorageEngine, tmp_path: Path, linked_disk: tuple[str, Path, str]
) -> None:
    disk, _, what = linked_disk
    before = fingerprint(tmp_path / "outside")
    engine.remove_image("r1", disk)  # its volume would be offered to clean, were it its own

    fixes = engine.check_storage_repository("r1")

    (report,) = foreign_reports(fixes)
    assert report.type == "mend" and report.image_ids == (disk,)
    assert what in report.description
    assert not any(f.type == "clean" for f in fixes)
    for fix in fixes:
        with pytest.raises(ForeignFile):
            engine.fix_storage_repository("r1", fix)
    assert_outside_unchanged(tmp_path, before)
    assert os.path.lexists(volume_of(tmp_path, "r1"))  # left for a person to look at


def test_a_stray_link_named_like_a_volume_is_reported_not_cleaned(
    engine: StorageEngine, qemu: QemuImg, tmp_path: Path
) -> None:
    (tmp_path / "outside").mkdir()
    target = tmp_path / "outside" / "precious.qcow2"
    qemu.create(str(target), "qcow2", MiB)
    os.symlink(target, tmp_path / "r1" / "volumes" / ("ab" * 16 + ".qcow2"))
    os.symlink(target, tmp_path / "r1" / "volumes" / (".tmp-" + "cd" * 16 + ".qcow2.copy-1-e1"))
    before = fingerprint(tmp_path / "outside")

    fixes = engine.check_storage_repository("r1")

    assert len(foreign_reports(fixes)) == 2 and len(fixes) == 2
    assert all(f.type == "mend" and f.image_ids == () for f in fixes)
    assert_outside_unchanged(tmp_path, before)


# --- the log, the marker and the hosts' directory -------------------------------------------

Relink = Callable[[Path], None]


def link_log(root: Path) -> None:
    shutil.move(root / "log", root.parent / "log-elsewhere")
    os.symlink(root.parent / "log-elsewhere", root / "log")


def link_marker(root: Path) -> None:
    shutil.move(root / "STRATA-REPOSITORY", root.parent / "marker-elsewhere")
    os.symlink(root.parent / "marker-elsewhere", root / "STRATA-REPOSITORY")


def link_hosts(root: Path) -> None:
    shutil.move(root / "hosts", root.parent / "hosts-elsewhere")
    os.symlink(root.parent / "hosts-elsewhere", root / "hosts")


@pytest.mark.parametrize("relink", [link_log, link_marker, link_hosts], ids=lambda f: f.__name__)
def test_a_repository_whose_log_marker_or_hosts_are_links_is_not_connected(
    tmp_path: Path, relink: Relink
) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    with StorageEngine("host-a", state_dir=str(tmp_path / "state")) as se:
        se.create_storage_repository("localfs-1.0", {"path": str(root)})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": str(root)})
    relink(root)
    before = fingerprint(tmp_path)
    with (
        StorageEngine("host-a", state_dir=str(tmp_path / "state2")) as se,
        pytest.raises(ForeignFile) as refused,
    ):
        se.connect_storage_repository("r1", "localfs-1.0", {"path": str(root)})
    assert "symbolic link" in refused.value.message
    assert {k: v for k, v in fingerprint(tmp_path).items() if "state" not in k} == {
        k: v for k, v in before.items() if "state" not in k
    }


def test_a_repository_reached_through_a_link_works_as_usual(tmp_path: Path, qemu: QemuImg) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "srv-repo")
    with StorageEngine("host-a", state_dir=str(tmp_path / "state"), poll_interval=0.1) as se:
        se.create_storage_repository("localfs-1.0", {"path": str(tmp_path / "srv-repo")})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": str(tmp_path / "srv-repo")})
        disk = new_disk(se, qemu, "r1", 0x33)
        snap = se.create_snapshot("r1", disk)
        assert se.wait_for_image("r1", disk, timeout=30).status == "optimized"
        assert se.wait_for_image("r1", snap, timeout=30).status == "optimized"
        prepared = se.prepare_image("r1", disk)
        assert se.lookup_image_by_path(prepared.path).image_id == disk
        se.teardown_image("r1", disk)
        assert se.check_storage_repository("r1") == []
