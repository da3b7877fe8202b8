"""Every bad input gets a typed error with a stable code, and leaves the log and the storage
byte-for-byte as they were (architecture §7)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import StorageEngine
from engine.errors import (
    ImageInUse,
    ImageNotFound,
    InvalidParameter,
    RepositoryAlreadyConnected,
    RepositoryNotConnected,
    RepositoryNotEmpty,
    StaleFix,
    StrataError,
    UnknownRepositoryFormat,
    WrongImageKind,
)
from tests.facade.images import MiB, tree_digest


@pytest.fixture
def world(engine: StorageEngine) -> dict[str, str]:
    disk = engine.create_virtual_disk("r1", 8 * MiB)
    snap = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", disk, timeout=30)
    engine.wait_for_image("r1", snap, timeout=30)
    return {"disk": disk, "snap": snap}


BAD_CALLS: list[tuple[str, type[StrataError], Callable[[StorageEngine, dict[str, str]], Any]]] = [
    ("size is a string", InvalidParameter, lambda se, w: se.create_virtual_disk("r1", "10G")),  # type: ignore[arg-type]
    ("size is negative", InvalidParameter, lambda se, w: se.create_virtual_disk("r1", -512)),
    ("size is zero", InvalidParameter, lambda se, w: se.create_virtual_disk("r1", 0)),
    ("size is absurd", InvalidParameter, lambda se, w: se.create_virtual_disk("r1", 2**70)),
    ("size is a bool", InvalidParameter, lambda se, w: se.create_virtual_disk("r1", True)),
    ("size is not sectors", InvalidParameter, lambda se, w: se.create_virtual_disk("r1", 1000)),
    ("repo id has a slash", InvalidParameter, lambda se, w: se.create_virtual_disk("../r1", MiB)),
    ("repo not connected", RepositoryNotConnected, lambda se, w: se.create_virtual_disk("r9", MiB)),
    ("image id with ..", InvalidParameter, lambda se, w: se.get_image_status("r1", "../../etc")),
    ("image id not a uuid", InvalidParameter, lambda se, w: se.remove_image("r1", "disk-1")),
    ("unknown image", ImageNotFound, lambda se, w: se.remove_image("r1", str(uuid.uuid4()))),
    ("image in the other repo", ImageNotFound, lambda se, w: se.remove_image("r2", w["disk"])),
    ("user data not encodable", InvalidParameter,
     lambda se, w: se.create_virtual_disk("r1", MiB, user_data={"f": object()})),
    ("user data too large", InvalidParameter,
     lambda se, w: se.create_virtual_disk("r1", MiB, user_data="x" * 100_000)),
    ("user data with a tuple", InvalidParameter,
     lambda se, w: se.set_user_data("r1", w["disk"], {"t": (1, 2)})),
    ("unknown option", InvalidParameter,
     lambda se, w: se.create_virtual_disk("r1", MiB, options={"turbo": True})),
    ("unknown strategy", InvalidParameter,
     lambda se, w: se.create_virtual_disk("r1", MiB, options={"strategy": "fast"})),
    ("auto_fix not a bool", InvalidParameter,
     lambda se, w: se.create_virtual_disk("r1", MiB, options={"auto_fix": "no"})),
    ("snapshot of a snapshot", WrongImageKind, lambda se, w: se.create_snapshot("r1", w["snap"])),
    ("disk based on a disk", WrongImageKind,
     lambda se, w: se.create_virtual_disk("r1", 8 * MiB, base_snapshot_id=w["disk"])),
    ("disk smaller than its snapshot", InvalidParameter,
     lambda se, w: se.create_virtual_disk("r1", MiB, base_snapshot_id=w["snap"])),
    ("grow a snapshot", WrongImageKind,
     lambda se, w: se.resize_virtual_disk("r1", w["snap"], 16 * MiB)),
    ("shrink a disk", InvalidParameter, lambda se, w: se.resize_virtual_disk("r1", w["disk"], MiB)),
    ("image hint elsewhere", ImageNotFound,
     lambda se, w: se.copy_image("r2", w["disk"], options={"image_hints": {w["disk"]: "r2"}})),
    ("participating repos exclude it", ImageNotFound,
     lambda se, w: se.copy_image("r2", w["disk"], options={"participating_repositories": ["r2"]})),
    ("incremental base in the wrong repo", ImageNotFound,
     lambda se, w: se.copy_image("r2", w["disk"], base_image_id=w["snap"])),
    ("fix that is not a fix", InvalidParameter,
     lambda se, w: se.fix_storage_repository("r1", {"type": "clean"})),  # type: ignore[arg-type]
    ("unknown format", UnknownRepositoryFormat,
     lambda se, w: se.connect_storage_repository("r3", "nfs-9.9", {"path": "/tmp"})),
    ("name already connected", RepositoryAlreadyConnected,
     lambda se, w: se.connect_storage_repository("r1", "localfs-1.0",
                                                  {"path": se.describe_repository("r2")["path"]})),
    ("format a formatted repository", RepositoryNotEmpty,
     lambda se, w: se.create_storage_repository("localfs-1.0",
                                                {"path": se.describe_repository("r1")["path"]})),
    ("wait with a negative timeout", InvalidParameter,
     lambda se, w: se.wait_for_image("r1", w["disk"], timeout=-1)),
    ("pull onto what is not a volume id", InvalidParameter,
     lambda se, w: se.block_pull("r1", w["disk"], base_volume_id="../../etc")),
    ("pull onto a volume of no chain", InvalidParameter,
     lambda se, w: se.block_pull("r1", w["disk"], base_volume_id=uuid.uuid4().hex)),
    ("pull a snapshot", WrongImageKind, lambda se, w: se.block_pull("r1", w["snap"])),
    ("pull with a negative bandwidth", InvalidParameter,
     lambda se, w: se.block_pull("r1", w["disk"], bandwidth=-1)),
    ("pull with a bandwidth as text", InvalidParameter,
     lambda se, w: se.block_pull("r1", w["disk"], bandwidth="1M")),  # type: ignore[arg-type]
    ("commit into a base a snapshot reads", ImageInUse,
     lambda se, w: se.block_commit("r1", w["disk"], *volume_pair(se, w["disk"], -1, 0))),
    ("commit down onto a higher volume", InvalidParameter,
     lambda se, w: se.block_commit("r1", w["disk"], *volume_pair(se, w["disk"], 0, -1))),
    ("abort with no job", StaleFix, lambda se, w: se.abort_block_job("r1", w["disk"])),
    ("abort with a pivot that is not a bool", InvalidParameter,
     lambda se, w: se.abort_block_job("r1", w["disk"], pivot="yes")),  # type: ignore[arg-type]
    ("bandwidth of no job", StaleFix,
     lambda se, w: se.set_block_job_bandwidth("r1", w["disk"], 1024)),
    ("chain of an unknown image", ImageNotFound,
     lambda se, w: se.get_volume_chain("r1", str(uuid.uuid4()))),
    ("migrate into its own repository", InvalidParameter,
     lambda se, w: se.migrate_image("r1", w["disk"], "r1")),
    ("migrate into a repository not connected", RepositoryNotConnected,
     lambda se, w: se.migrate_image("r1", w["disk"], "r9")),
    ("migrate into a repo id with a slash", InvalidParameter,
     lambda se, w: se.migrate_image("r1", w["disk"], "../r2")),
    ("migrate into a repo id that is not text", InvalidParameter,
     lambda se, w: se.migrate_image("r1", w["disk"], 2)),  # type: ignore[arg-type]
    ("migrate from a repository not connected", RepositoryNotConnected,
     lambda se, w: se.migrate_image("r9", w["disk"], "r2")),
    ("migrate an id that is not an id", InvalidParameter,
     lambda se, w: se.migrate_image("r1", "../../etc", "r2")),
    ("migrate an unknown image", ImageNotFound,
     lambda se, w: se.migrate_image("r1", str(uuid.uuid4()), "r2")),
    ("migrate from the repository it is not in", ImageNotFound,
     lambda se, w: se.migrate_image("r2", w["disk"], "r1")),
    ("clone into its own repository", InvalidParameter,
     lambda se, w: se.clone_image_structure("r1", w["disk"], "r1")),
    ("clone into a repository not connected", RepositoryNotConnected,
     lambda se, w: se.clone_image_structure("r1", w["disk"], "r9")),
    ("clone an id that is not an id", InvalidParameter,
     lambda se, w: se.clone_image_structure("r1", "disk-1", "r2")),
    ("clone an unknown image", ImageNotFound,
     lambda se, w: se.clone_image_structure("r1", str(uuid.uuid4()), "r2")),
    ("sync of an unknown type", InvalidParameter,
     lambda se, w: se.sync_image_data("r1", w["disk"], "r2", "EVERYTHING")),
    ("sync type in lower case", InvalidParameter,
     lambda se, w: se.sync_image_data("r1", w["disk"], "r2", "all")),
    ("sync type that is not text", InvalidParameter,
     lambda se, w: se.sync_image_data("r1", w["disk"], "r2", 1)),  # type: ignore[arg-type]
    ("sync into a repository not connected", RepositoryNotConnected,
     lambda se, w: se.sync_image_data("r1", w["disk"], "r9", "ALL")),
    ("sync an unknown image", ImageNotFound,
     lambda se, w: se.sync_image_data("r1", str(uuid.uuid4()), "r2", "ALL")),
    ("replicate an id that is not an id", InvalidParameter,
     lambda se, w: se.disk_replicate_start("r1", "../../etc", "r2")),
    ("replicate an unknown image", ImageNotFound,
     lambda se, w: se.disk_replicate_start("r1", str(uuid.uuid4()), "r2")),
    ("replicate into a repository not connected", RepositoryNotConnected,
     lambda se, w: se.disk_replicate_start("r1", w["disk"], "r9")),
    ("finish into a repo id with a slash", InvalidParameter,
     lambda se, w: se.disk_replicate_finish("r1", w["disk"], "../r2")),
    ("finish from a repository not connected", RepositoryNotConnected,
     lambda se, w: se.disk_replicate_finish("r9", w["disk"], "r2")),
    ("finish an unknown image", ImageNotFound,
     lambda se, w: se.disk_replicate_finish("r1", str(uuid.uuid4()), "r2")),
]  # fmt: skip


def volume_pair(se: StorageEngine, image: str, top: int, base: int) -> tuple[str, str]:
    """The ids of the image's volumes at ``top`` and ``base`` in its chain (base first)."""
    chain = se.get_volume_chain("r1", image)
    return chain[top].volume_id, chain[base].volume_id


@pytest.mark.parametrize(("name", "error", "call"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_a_bad_call_is_refused_and_changes_nothing(
    engine: StorageEngine,
    world: dict[str, str],
    repo_paths: tuple[str, str],
    name: str,
    error: type[StrataError],
    call: Callable[[StorageEngine, dict[str, str]], Any],
) -> None:
    before = tree_digest(*repo_paths)
    with pytest.raises(error) as caught:
        call(engine, world)
    assert caught.value.code and isinstance(caught.value.code, str)
    assert str(caught.value)  # a message that says what to do
    assert tree_digest(*repo_paths) == before


def test_a_non_positive_lease_timeout_is_refused(tmp_path: Path) -> None:
    for bad in (0, -1, float("nan"), "60", None):
        with pytest.raises(InvalidParameter):
            StorageEngine("host-a", state_dir=str(tmp_path), lease_timeout=bad)  # type: ignore[arg-type]


def test_a_host_id_that_is_not_a_name_is_refused(tmp_path: Path) -> None:
    for bad in ("", "a/b", "..", "x" * 100, 7, "host-a\n", "host-a\r\n"):
        with pytest.raises(InvalidParameter):
            StorageEngine(bad, state_dir=str(tmp_path))  # type: ignore[arg-type]


def test_a_repo_id_with_a_trailing_newline_is_refused(engine: StorageEngine) -> None:
    # "$" in a pattern also matches before a final newline: "r1\n" would be a second name.
    with pytest.raises(InvalidParameter, match="repo_id"):
        engine.create_virtual_disk("r1\n", MiB)
    with pytest.raises(InvalidParameter, match="repo_id"):
        engine.connect_storage_repository("r3\n", "localfs-1.0", {"path": "/nonexistent"})


def test_formatting_a_non_empty_directory_is_refused(tmp_path: Path, engine: StorageEngine) -> None:
    place = tmp_path / "busy"
    place.mkdir()
    (place / "data.txt").write_text("keep me")
    with pytest.raises(RepositoryNotEmpty):
        engine.create_storage_repository("localfs-1.0", {"path": str(place)})
    assert os.listdir(place) == ["data.txt"]
