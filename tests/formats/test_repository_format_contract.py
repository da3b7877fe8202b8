"""The contract every repository format driver passes, run once per driver in FORMATS."""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.errors import (
    ForeignFile,
    InvalidParameter,
    NotARepository,
    RepositoryAlreadyFormatted,
    RepositoryFormatMismatch,
    RepositoryNotEmpty,
    UnknownRepositoryFormat,
    VolumeAlreadyExists,
    VolumeFileNotFound,
)
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.repository import localfs
from engine.formats.repository.driver import RepositoryFormat, RepositoryStorage
from engine.formats.repository.registry import FORMATS, get_format
from engine.log import NewEvent, OperationLog

MiB = 2**20
qemu = QemuImg()


@pytest.fixture(params=sorted(FORMATS))
def driver(request: pytest.FixtureRequest) -> type[RepositoryFormat]:
    return FORMATS[request.param]


def new_repository(driver: type[RepositoryFormat], path: Path) -> RepositoryStorage:
    path.mkdir(parents=True)
    driver.create({"path": str(path)}, "host-a")
    return driver.open({"path": str(path)})


def new_volume(
    repo: RepositoryStorage, fmt: str = "qcow2", pattern: int | None = None, backing: str = ""
) -> str:
    """A published volume made the way a stage makes one: in a temporary file first."""
    volume_id = uuid.uuid4().hex
    temp = repo.temp_path(volume_id, fmt, "create")
    if backing:
        relative = repo.relative_backing(temp, backing)
        qemu.create(temp, fmt, None, backing=relative, backing_fmt="qcow2")
    else:
        qemu.create(temp, fmt, 4 * MiB)
    if pattern is not None:
        qemu.write_pattern(temp, fmt, 0, MiB, pattern)
    final = repo.volume_path(volume_id, fmt)
    repo.publish(temp, final)
    return final


def test_every_format_is_registered_under_its_name_and_version() -> None:
    for key, driver in FORMATS.items():
        assert key == f"{driver.name}-{driver.version}"
        assert get_format(key) is driver


def test_an_unknown_format_is_a_typed_error_that_lists_the_known_ones() -> None:
    with pytest.raises(UnknownRepositoryFormat) as caught:
        get_format("nfs-3.4")

    assert caught.value.code == "unknown_repository_format"
    assert all(name in caught.value.message for name in FORMATS)


def test_a_new_repository_opens_with_an_empty_log_and_no_volumes(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")

    assert repo.root == str(tmp_path / "repo")
    assert repo.list_volume_files() == []
    with OperationLog.open(repo.log_dir, "host-b") as log:
        assert log.last_seq == 0
        log.append([NewEvent(uuid.uuid4(), 1, "test", b"{}")])
    described = repo.describe()
    assert described["format"] == f"{driver.name}-{driver.version}"
    assert described["version"] == driver.version
    assert described["path"] == repo.root
    assert 0 < described["free_bytes"] <= described["total_bytes"]
    assert repo.free_bytes() > 0


def test_creating_refuses_a_directory_that_is_not_empty(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    (tmp_path / "precious.txt").write_text("keep me")

    with pytest.raises(RepositoryNotEmpty) as caught:
        driver.create({"path": str(tmp_path)}, "host-a")

    assert "precious.txt" in caught.value.message
    assert os.listdir(tmp_path) == ["precious.txt"]


def test_creating_refuses_a_place_already_formatted(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    new_repository(driver, tmp_path / "repo")

    with pytest.raises(RepositoryAlreadyFormatted) as caught:
        driver.create({"path": str(tmp_path / "repo")}, "host-b")

    assert f"{driver.name}-{driver.version}" in caught.value.message
    assert isinstance(caught.value, RepositoryNotEmpty)


def test_creating_with_a_bad_host_id_leaves_the_directory_empty(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    with pytest.raises(InvalidParameter):
        driver.create({"path": str(tmp_path)}, "h" * 1000)

    assert os.listdir(tmp_path) == []


def test_opening_a_repository_of_another_version_is_a_format_mismatch(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    class FutureVersion(driver):  # type: ignore[valid-type,misc]
        version = "99.0"

    new_repository(FutureVersion, tmp_path / "repo")

    with pytest.raises(RepositoryFormatMismatch) as caught:
        driver.open({"path": str(tmp_path / "repo")})

    assert caught.value.found == f"{driver.name}-99.0"
    assert caught.value.expected == f"{driver.name}-{driver.version}"


@pytest.mark.parametrize(
    ("parameters", "error"),
    [
        ({"path": "relative/repo"}, InvalidParameter),
        ({"path": "/no/such/directory"}, InvalidParameter),
        ({"path": 42}, InvalidParameter),
        ({}, InvalidParameter),
        ({"path": "{tmp}", "pth": "/typo"}, InvalidParameter),
        ("{tmp}", InvalidParameter),
        ({"path": "{tmp}"}, NotARepository),
    ],
    ids=["relative", "missing", "not a string", "no path", "unknown key", "not a mapping", "empty"],
)
def test_opening_with_bad_parameters_or_where_no_repository_is_refused(
    driver: type[RepositoryFormat], tmp_path: Path, parameters: object, error: type[Exception]
) -> None:
    def fill(value: object) -> object:
        return str(tmp_path) if value == "{tmp}" else value

    if isinstance(parameters, dict):
        parameters = {key: fill(value) for key, value in parameters.items()}
    else:
        parameters = fill(parameters)

    with pytest.raises(error):
        driver.open(parameters)  # type: ignore[arg-type]
    if error is InvalidParameter:
        with pytest.raises(InvalidParameter):
            driver.create(parameters, "host-a")  # type: ignore[arg-type]


BAD_IDS = ["../" + "0" * 29, "a/" + "0" * 30, "..", "", "0" * 31, "A" * 32, str(uuid.uuid4()), 7]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_volume_ids_that_are_not_ids_are_refused(
    driver: type[RepositoryFormat], tmp_path: Path, bad: object
) -> None:
    repo = new_repository(driver, tmp_path / "repo")

    with pytest.raises(InvalidParameter):
        repo.volume_path(bad, "raw")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter):
        repo.temp_path(bad, "raw", "copy")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda repo: repo.volume_path(uuid.uuid4().hex, "vmdk"),
        lambda repo: repo.temp_path(uuid.uuid4().hex, "qcow2", "a.b"),
        lambda repo: repo.temp_path(uuid.uuid4().hex, "qcow2", "../x"),
        lambda repo: repo.temp_path(uuid.uuid4().hex, "qcow2", ""),
        lambda repo: repo.remove("/etc/passwd"),
        lambda repo: repo.remove(os.path.join(repo.root, "volumes", "..", "log")),
        lambda repo: repo.relative_backing("/etc/passwd", "/etc/hosts"),
    ],
    ids=[
        "format",
        "tag with a dot",
        "tag with a slash",
        "empty tag",
        "foreign file",
        "dot-dot",
        "backing of a foreign file",
    ],
)
def test_formats_tags_and_paths_outside_the_repository_are_refused(
    driver: type[RepositoryFormat], tmp_path: Path, call: Callable[[RepositoryStorage], object]
) -> None:
    repo = new_repository(driver, tmp_path / "repo")

    with pytest.raises(InvalidParameter):
        call(repo)


def test_temporary_files_are_listed_as_temporary_until_published(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    temp = repo.temp_path(volume_id, "raw", "copy-3")
    qemu.create(temp, "raw", 64 * MiB)
    qemu.write_pattern(temp, "raw", 0, MiB, 0x3C)

    [listed] = repo.list_volume_files()
    assert (listed.volume_id, listed.fmt, listed.path) == (volume_id, "raw", temp)
    assert listed.is_temporary and listed.tag == "copy-3"
    assert listed.size == 64 * MiB
    assert MiB <= listed.allocated < 4 * MiB

    final = repo.volume_path(volume_id, "raw")
    repo.publish(temp, final)

    [listed] = repo.list_volume_files()
    assert (listed.volume_id, listed.fmt, listed.path) == (volume_id, "raw", final)
    assert not listed.is_temporary and listed.tag is None
    assert qemu.read_pattern_matches(final, "raw", 0, MiB, 0x3C)


def test_temporaries_of_a_volume_are_only_its_own_temporary_files(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    for volume_id, tag in ((mine, "op-0-e1"), (mine, "op-0-e2"), (other, "op-0-e1")):
        qemu.create(repo.temp_path(volume_id, "qcow2", tag), "qcow2", MiB)
    qemu.create(repo.volume_path(mine, "qcow2"), "qcow2", MiB)  # published: not a temporary

    found = repo.temporaries_of(mine)
    assert [(f.volume_id, f.tag, f.is_temporary) for f in found] == [
        (mine, "op-0-e1", True),
        (mine, "op-0-e2", True),
    ]
    assert repo.temporaries_of(uuid.uuid4().hex) == []


def test_publish_refuses_to_overwrite_a_volume(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    final = new_volume(repo, "raw", pattern=0x11)
    volume_id = os.path.basename(final).split(".")[0]
    temp = repo.temp_path(volume_id, "raw", "again")
    qemu.create(temp, "raw", 4 * MiB)
    qemu.write_pattern(temp, "raw", 0, MiB, 0x22)

    with pytest.raises(VolumeAlreadyExists):
        repo.publish(temp, final)

    assert qemu.read_pattern_matches(final, "raw", 0, MiB, 0x11)
    assert qemu.read_pattern_matches(temp, "raw", 0, MiB, 0x22)


def test_publish_only_gives_a_temporary_file_its_own_volume_name(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    temp = repo.temp_path(uuid.uuid4().hex, "raw", "copy")
    qemu.create(temp, "raw", MiB)

    with pytest.raises(InvalidParameter):
        repo.publish(temp, repo.volume_path(uuid.uuid4().hex, "raw"))
    with pytest.raises(VolumeFileNotFound):
        missing = uuid.uuid4().hex
        repo.publish(repo.temp_path(missing, "raw", "x"), repo.volume_path(missing, "raw"))


def test_publishing_again_after_a_crash_between_the_two_names_completes(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    temp, final = repo.temp_path(volume_id, "raw", "copy"), repo.volume_path(volume_id, "raw")
    qemu.create(temp, "raw", MiB)
    os.link(temp, final)  # where a publish that was killed half way leaves things

    repo.publish(temp, final)

    assert [f.path for f in repo.list_volume_files()] == [final]


def test_remove_is_idempotent(driver: type[RepositoryFormat], tmp_path: Path) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    final = new_volume(repo)
    temp = repo.temp_path(uuid.uuid4().hex, "qcow2", "leftover")
    qemu.create(temp, "qcow2", MiB)

    for _ in range(2):
        repo.remove(final)
        repo.remove(temp)

    assert repo.list_volume_files() == []


def test_a_backing_reference_into_another_repository_survives_moving_both(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    source = new_repository(driver, site / "source")
    target = new_repository(driver, site / "target")
    base = new_volume(source, pattern=0x5A)
    overlay = new_volume(target, backing=base)
    sibling = new_volume(source, backing=base)

    assert source.relative_backing(sibling, base) == os.path.basename(base)
    assert not os.path.isabs(qemu.info(overlay, fmt="qcow2")["backing-filename"])
    shutil.move(str(site), str(tmp_path / "moved"))
    moved = driver.open({"path": str(tmp_path / "moved" / "target")})

    [volume] = moved.list_volume_files()
    chain = qemu.info(volume.path, chain=True, fmt="qcow2")
    assert len(chain) == 2
    assert qemu.read_pattern_matches(volume.path, "qcow2", 0, MiB, 0x5A)


# --- links inside a repository (docs/adr/0016) ------------------------------------------------


def outside_image(tmp_path: Path, pattern: int) -> tuple[Path, bytes]:
    """An image outside the repository, and its bytes (which must never change)."""
    path = tmp_path / "outside" / "image.qcow2"
    path.parent.mkdir(exist_ok=True)
    qemu.create(str(path), "qcow2", MiB)
    qemu.write_pattern(str(path), "qcow2", 0, MiB, pattern)
    return path, path.read_bytes()


def test_links_in_the_volume_directory_are_listed_as_foreign_and_refused(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    outside, content = outside_image(tmp_path, 0x42)
    own = new_volume(repo)
    symlinked = repo.volume_path(uuid.uuid4().hex, "qcow2")
    hard_linked = repo.volume_path(uuid.uuid4().hex, "qcow2")
    os.symlink(outside, symlinked)
    os.link(outside, hard_linked)

    listed = {f.path: f.foreign for f in repo.list_volume_files()}

    assert listed[own] is None
    assert "symbolic link" in (listed[symlinked] or "")
    assert "hard link" in (listed[hard_linked] or "")
    repo.check_own_file(own)
    repo.check_own_file(repo.volume_path(uuid.uuid4().hex, "raw"))  # missing: not foreign
    for path in (symlinked, hard_linked):
        with pytest.raises(ForeignFile):
            repo.check_own_file(path)
        with pytest.raises(ForeignFile):
            repo.remove(path)
        assert os.path.lexists(path)
    assert outside.read_bytes() == content


def test_a_temporary_file_that_is_a_link_is_neither_published_nor_removed(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    outside, content = outside_image(tmp_path, 0x43)
    volume_id = uuid.uuid4().hex
    temp = repo.temp_path(volume_id, "qcow2", "copy-1-e1")
    os.symlink(outside, temp)

    [found] = repo.temporaries_of(volume_id)
    assert found.foreign is not None and "symbolic link" in found.foreign
    with pytest.raises(ForeignFile):
        repo.publish(temp, repo.volume_path(volume_id, "qcow2"))
    with pytest.raises(ForeignFile):
        repo.remove(temp)
    assert not os.path.lexists(repo.volume_path(volume_id, "qcow2"))
    assert outside.read_bytes() == content


def test_a_volume_with_its_temporary_name_too_is_not_a_hard_link_to_refuse(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    temp, final = repo.temp_path(volume_id, "raw", "copy"), repo.volume_path(volume_id, "raw")
    qemu.create(temp, "raw", MiB)
    os.link(temp, final)  # a publish killed between its two steps

    assert [f.foreign for f in repo.list_volume_files()] == [None, None]
    assert [f.foreign for f in repo.temporaries_of(volume_id)] == [None]
    repo.check_own_file(final)
    repo.remove(temp)
    repo.check_own_file(final)


def test_a_volume_directory_that_is_a_link_is_never_gone_through(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    other = new_repository(driver, tmp_path / "other")
    theirs = new_volume(other, pattern=0x44)
    repo = new_repository(driver, tmp_path / "repo")
    shutil.rmtree(tmp_path / "repo" / "volumes")
    os.symlink(tmp_path / "other" / "volumes", tmp_path / "repo" / "volumes")
    mine = os.path.join(str(tmp_path / "repo" / "volumes"), os.path.basename(theirs))
    before = sorted(os.listdir(tmp_path / "other" / "volumes"))

    reopened = driver.open({"path": str(tmp_path / "repo")})  # connects: its check reports it
    for call in (
        lambda: reopened.list_volume_files(),
        lambda: reopened.temporaries_of(os.path.basename(theirs).split(".")[0]),
        lambda: reopened.check_own_file(mine),
        lambda: reopened.remove(mine),
    ):
        with pytest.raises(ForeignFile):
            call()
    assert repo.root == reopened.root
    assert sorted(os.listdir(tmp_path / "other" / "volumes")) == before
    assert qemu.read_pattern_matches(theirs, "qcow2", 0, MiB, 0x44)


@pytest.mark.parametrize("name", ["log", "STRATA-REPOSITORY"])
def test_a_repository_whose_log_or_marker_is_a_link_is_not_opened(
    driver: type[RepositoryFormat], tmp_path: Path, name: str
) -> None:
    new_repository(driver, tmp_path / "repo")
    shutil.move(tmp_path / "repo" / name, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "repo" / name)

    with pytest.raises(ForeignFile):
        driver.open({"path": str(tmp_path / "repo")})


def test_a_repository_reached_through_a_link_opens(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    new_repository(driver, tmp_path / "repo")
    os.symlink(tmp_path / "repo", tmp_path / "link")
    repo = driver.open({"path": str(tmp_path / "link")})
    final = new_volume(repo)
    assert [f.foreign for f in repo.list_volume_files()] == [None]
    repo.check_own_file(final)


def test_a_localfs_volume_whose_publish_ends_while_it_is_checked_is_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader in another repository checks a volume right as its publish drops the temporary
    name: the file had two names when stat'ed, and one when they were counted (localfs counts
    a file's names to tell a hard link; not a contract: another driver tells it its own way)."""
    repo = new_repository(localfs.LocalFS, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    temp, final = repo.temp_path(volume_id, "raw", "copy"), repo.volume_path(volume_id, "raw")
    qemu.create(temp, "raw", MiB)
    os.link(temp, final)  # the publish's first step
    counted = localfs._names

    def publish_ends_first(directory: int, st: os.stat_result, volume: str) -> int:
        if os.path.exists(temp):
            os.unlink(temp)  # the publish's second step, between the stat and the count
        return counted(directory, st, volume)

    monkeypatch.setattr(localfs, "_names", publish_ends_first)

    repo.check_own_file(final)


# --- replace and copy_in: a migration's sync (docs/adr/0029) -----------------------------------


def volume_of(path: str) -> str:
    return os.path.basename(path).split(".")[0]


def test_replace_puts_a_finished_temporary_file_in_place_of_its_volume(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    final = new_volume(repo, "raw", pattern=0x11)
    temp = repo.temp_path(volume_of(final), "raw", "sync-2-e1")
    qemu.create(temp, "raw", 4 * MiB)
    qemu.write_pattern(temp, "raw", 0, MiB, 0x22)
    inode = os.stat(temp).st_ino

    repo.replace(temp, final)

    assert [(f.path, f.is_temporary) for f in repo.list_volume_files()] == [(final, False)]
    assert os.stat(final).st_ino == inode  # the finished file itself: never half written
    assert qemu.read_pattern_matches(final, "raw", 0, MiB, 0x22)


def test_replace_refuses_a_volume_that_does_not_exist_and_leaves_the_temporary_file(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    temp, final = repo.temp_path(volume_id, "raw", "sync"), repo.volume_path(volume_id, "raw")
    qemu.create(temp, "raw", MiB)

    with pytest.raises(VolumeFileNotFound):
        repo.replace(temp, final)

    assert not os.path.lexists(final)
    assert [f.path for f in repo.list_volume_files()] == [temp]


def test_replace_refuses_a_missing_temporary_file_and_leaves_the_volume(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    final = new_volume(repo, "raw", pattern=0x11)

    with pytest.raises(VolumeFileNotFound):
        repo.replace(repo.temp_path(volume_of(final), "raw", "sync"), final)

    assert qemu.read_pattern_matches(final, "raw", 0, MiB, 0x11)


@pytest.mark.parametrize(
    "pair",
    [
        lambda repo, final: (repo.temp_path(uuid.uuid4().hex, "raw", "sync"), final),
        lambda repo, final: (repo.temp_path(volume_of(final), "qcow2", "sync"), final),
        lambda repo, final: (final, final),
        lambda repo, final: (
            repo.temp_path(volume_of(final), "raw", "a"),
            repo.temp_path(volume_of(final), "raw", "b"),
        ),
        lambda repo, final: ("/etc/passwd", final),
        lambda repo, final: (repo.temp_path(volume_of(final), "raw", "sync"), "/etc/passwd"),
    ],
    ids=["another volume's", "another format's", "not a temporary", "onto a temporary",
         "outside", "onto a file outside"],
)  # fmt: skip
def test_replace_only_puts_a_temporary_file_in_place_of_its_own_volume(
    driver: type[RepositoryFormat],
    tmp_path: Path,
    pair: Callable[[RepositoryStorage, str], tuple[str, str]],
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    final = new_volume(repo, "raw", pattern=0x11)
    temp, target = pair(repo, final)
    if temp.startswith(repo.root) and not os.path.exists(temp):
        qemu.create(temp, temp.split(".")[-2], MiB)
    before = sorted(os.listdir(os.path.dirname(final)))

    with pytest.raises(InvalidParameter):
        repo.replace(temp, target)

    assert sorted(os.listdir(os.path.dirname(final))) == before
    assert qemu.read_pattern_matches(final, "raw", 0, MiB, 0x11)


@pytest.mark.parametrize("linked", ["temporary", "volume"])
@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_replace_refuses_a_temporary_file_or_volume_that_is_a_link(
    driver: type[RepositoryFormat], tmp_path: Path, linked: str, link: str
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    outside, content = outside_image(tmp_path, 0x45)
    volume_id = uuid.uuid4().hex
    temp = repo.temp_path(volume_id, "qcow2", "sync-1-e1")
    final = repo.volume_path(volume_id, "qcow2")
    make_link = os.symlink if link == "symbolic" else os.link
    if linked == "temporary":
        make_link(outside, temp)
        qemu.create(final, "qcow2", MiB)
    else:
        qemu.create(temp, "qcow2", MiB)
        make_link(outside, final)

    with pytest.raises(ForeignFile):
        repo.replace(temp, final)

    assert os.path.lexists(temp) and os.path.lexists(final)
    assert os.path.samefile(temp if linked == "temporary" else final, outside)
    assert outside.read_bytes() == content


def test_replace_of_a_volume_with_its_temporary_name_too_leaves_the_volume(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    temp, final = repo.temp_path(volume_id, "raw", "sync"), repo.volume_path(volume_id, "raw")
    qemu.create(temp, "raw", MiB)
    qemu.write_pattern(temp, "raw", 0, MiB, 0x33)
    os.link(temp, final)  # a publish killed between its two steps

    repo.replace(temp, final)

    assert [f.path for f in repo.list_volume_files()] == [final]
    assert qemu.read_pattern_matches(final, "raw", 0, MiB, 0x33)


def test_a_localfs_replace_makes_the_data_durable_before_the_name_and_the_name_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order a crash must not undo: the temporary file's data on storage, then the rename,
    then the directory (localfs's way; another driver keeps the promise its own way)."""
    repo = new_repository(localfs.LocalFS, tmp_path / "repo")
    final = new_volume(repo, "raw", pattern=0x11)
    temp = repo.temp_path(volume_of(final), "raw", "sync")
    qemu.create(temp, "raw", MiB)
    steps: list[str] = []
    fsync, rename = os.fsync, os.rename
    named = {
        os.stat(temp).st_ino: "fsync file",
        os.stat(repo.root + "/volumes").st_ino: "fsync directory",
    }

    def recorded_fsync(fd: int) -> None:
        steps.append(named.get(os.fstat(fd).st_ino, "fsync of another file"))
        fsync(fd)

    def recorded_rename(*args: object, **kwargs: object) -> None:
        steps.append("rename")
        rename(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "rename", recorded_rename)

    repo.replace(temp, final)

    assert steps == ["fsync file", "rename", "fsync directory"]


def sparse_source(repo: RepositoryStorage) -> str:
    """A 64 MiB raw volume holding 1 MiB at 0 and 1 MiB at 32 MiB, holes elsewhere."""
    path = new_volume(repo, "raw")
    os.truncate(path, 64 * MiB)
    qemu.write_pattern(path, "raw", 0, MiB, 0x61)
    qemu.write_pattern(path, "raw", 32 * MiB, MiB, 0x62)
    return path


def test_copy_in_copies_another_repositorys_volume_byte_for_byte_into_a_temporary_file(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    base = new_volume(source, pattern=0x51)
    top = new_volume(source, backing=base)
    qemu.write_pattern(top, "qcow2", 2 * MiB, MiB, 0x52)
    temp = target.temp_path(volume_of(top), "qcow2", "sync-3-e1")

    target.copy_in(top, temp)

    assert filecmp.cmp(top, temp, shallow=False)
    [listed] = target.list_volume_files()
    assert (listed.path, listed.is_temporary, listed.foreign) == (temp, True, None)


def test_copy_in_keeps_the_holes_of_a_sparse_volume(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    volume = sparse_source(source)
    temp = target.temp_path(volume_of(volume), "raw", "sync")

    target.copy_in(volume, temp)

    assert filecmp.cmp(volume, temp, shallow=False)
    assert os.path.getsize(temp) == 64 * MiB
    assert os.stat(temp).st_blocks * 512 <= 4 * MiB


def test_copy_in_of_a_volume_ending_in_a_hole_keeps_its_length(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    empty = new_volume(source, "raw")
    os.truncate(empty, 16 * MiB)  # a hole after what qemu-img wrote (its first block, if any)
    temp = target.temp_path(volume_of(empty), "raw", "sync")

    target.copy_in(empty, temp)

    assert os.path.getsize(temp) == 16 * MiB
    assert os.stat(temp).st_blocks <= os.stat(empty).st_blocks
    assert filecmp.cmp(empty, temp, shallow=False)


def test_copy_in_reports_the_bytes_copied_as_it_goes(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    volume = sparse_source(source)
    told: list[int] = []

    target.copy_in(volume, target.temp_path(volume_of(volume), "raw", "sync"), progress=told.append)

    assert told == sorted(told) and len(told) >= 2  # once per data extent at least
    assert 2 * MiB <= told[-1] <= 64 * MiB  # the data, never the holes' bytes


def test_copy_in_stops_when_cancelled(driver: type[RepositoryFormat], tmp_path: Path) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    volume = sparse_source(source)
    cancel = threading.Event()
    temp = target.temp_path(volume_of(volume), "raw", "sync")

    target.copy_in(volume, temp, progress=lambda done: cancel.set(), cancel=cancel)

    # The first extent, and nothing after the cancel: the second extent was never copied.
    assert os.stat(temp).st_blocks * 512 < 2 * MiB
    with open(temp, "rb") as copied:
        copied.seek(32 * MiB)
        assert b"\x62" not in copied.read(MiB)
    target.remove(temp)
    already = threading.Event()
    already.set()
    target.copy_in(volume, temp, cancel=already)
    assert os.stat(temp).st_blocks == 0


@pytest.mark.parametrize(
    "place",
    [
        lambda source, target, volume_id: "/tmp/copied.raw",
        lambda source, target, volume_id: target.root + "/volumes/../log/x.raw",
        lambda source, target, volume_id: source.temp_path(volume_id, "raw", "sync"),
        lambda source, target, volume_id: target.volume_path(volume_id, "raw"),
    ],
    ids=["outside", "dot-dot", "another repository's", "a volume, not a temporary file"],
)
def test_copy_in_writes_only_a_temporary_file_of_its_repository(
    driver: type[RepositoryFormat],
    tmp_path: Path,
    place: Callable[[RepositoryStorage, RepositoryStorage, str], str],
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    volume = new_volume(source, "raw", pattern=0x71)
    temp = place(source, target, volume_of(volume))

    with pytest.raises(InvalidParameter):
        target.copy_in(volume, temp)

    assert not os.path.lexists(temp)
    assert target.list_volume_files() == []
    assert [f.path for f in source.list_volume_files()] == [volume]


def test_copy_in_never_writes_through_an_existing_temporary_file(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    outside, content = outside_image(tmp_path, 0x46)
    volume = new_volume(source, "raw", pattern=0x71)
    linked = target.temp_path(volume_of(volume), "raw", "sync")
    os.symlink(outside, linked)
    left = target.temp_path(volume_of(volume), "raw", "earlier")
    qemu.create(left, "raw", MiB)

    for temp in (linked, left):
        with pytest.raises(VolumeAlreadyExists):
            target.copy_in(volume, temp)

    assert outside.read_bytes() == content
    assert os.path.getsize(left) == MiB
    assert not qemu.read_pattern_matches(left, "raw", 0, MiB, 0x71)


def test_copy_in_does_not_follow_a_source_that_is_a_link(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    source = new_repository(driver, tmp_path / "source")
    target = new_repository(driver, tmp_path / "target")
    outside, _ = outside_image(tmp_path, 0x47)
    linked = source.volume_path(uuid.uuid4().hex, "qcow2")
    os.symlink(outside, linked)
    temp = target.temp_path(volume_of(linked), "qcow2", "sync")

    with pytest.raises(ForeignFile):
        target.copy_in(linked, temp)
    with pytest.raises(VolumeFileNotFound):
        target.copy_in(source.volume_path(uuid.uuid4().hex, "raw"), temp)

    assert target.list_volume_files() == []


def test_a_localfs_copy_in_between_two_filesystems_copies_through_the_process(
    tmp_path: Path,
) -> None:
    """Linux's copy_file_range refuses two filesystems of different types (EXDEV): a copy from
    a repository in memory (tmpfs) to one on disk must still be made."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    place = Path(tempfile.mkdtemp(prefix="strata-", dir=shm))
    try:
        source = new_repository(localfs.LocalFS, place / "source")
        target = new_repository(localfs.LocalFS, tmp_path / "target")
        volume = sparse_source(source)
        temp = target.temp_path(volume_of(volume), "raw", "sync")
        told: list[int] = []

        target.copy_in(volume, temp, progress=told.append)

        assert filecmp.cmp(volume, temp, shallow=False)
        assert os.stat(temp).st_blocks * 512 <= 4 * MiB
        assert told[-1] == 2 * MiB
    finally:
        shutil.rmtree(place)


def test_retag_gives_a_temporary_file_a_later_attempt_s_name_and_keeps_its_content(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    old = repo.temp_path(volume_id, "raw", "op-0-e1")
    new = repo.temp_path(volume_id, "raw", "op-0-e2")
    qemu.create(old, "raw", 4 * MiB)
    qemu.write_pattern(old, "raw", 0, MiB, 0x33)
    inode = os.stat(old).st_ino

    repo.retag(old, new)

    assert [(f.path, f.tag) for f in repo.list_volume_files()] == [(new, "op-0-e2")]
    assert os.stat(new).st_ino == inode
    assert qemu.read_pattern_matches(new, "raw", 0, MiB, 0x33)


def test_retag_refuses_a_missing_file_and_never_replaces_one(
    driver: type[RepositoryFormat], tmp_path: Path
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    old = repo.temp_path(volume_id, "raw", "op-0-e1")
    new = repo.temp_path(volume_id, "raw", "op-0-e2")
    with pytest.raises(VolumeFileNotFound):
        repo.retag(old, new)
    qemu.create(old, "raw", MiB)
    qemu.create(new, "raw", MiB)
    qemu.write_pattern(new, "raw", 0, MiB, 0x44)

    with pytest.raises(VolumeAlreadyExists):
        repo.retag(old, new)

    assert qemu.read_pattern_matches(new, "raw", 0, MiB, 0x44)
    assert sorted(f.path for f in repo.list_volume_files()) == sorted([old, new])


@pytest.mark.parametrize(
    "pair",
    [
        lambda repo, v: (repo.temp_path(v, "raw", "a"),
                         repo.temp_path(uuid.uuid4().hex, "raw", "b")),
        lambda repo, v: (repo.temp_path(v, "raw", "a"), repo.temp_path(v, "qcow2", "b")),
        lambda repo, v: (repo.temp_path(v, "raw", "a"), repo.volume_path(v, "raw")),
        lambda repo, v: (repo.temp_path(v, "raw", "a"), "/tmp/elsewhere"),
    ],
    ids=["another volume's", "another format's", "onto the volume", "outside"],
)  # fmt: skip
def test_retag_only_renames_within_one_volume_s_temporary_files(
    driver: type[RepositoryFormat],
    tmp_path: Path,
    pair: Callable[[RepositoryStorage, str], tuple[str, str]],
) -> None:
    repo = new_repository(driver, tmp_path / "repo")
    volume_id = uuid.uuid4().hex
    old, new = pair(repo, volume_id)
    qemu.create(old, "raw", MiB)

    with pytest.raises(InvalidParameter):
        repo.retag(old, new)

    assert [f.path for f in repo.list_volume_files()] == [old]
