"""The world the crash sweep starts from, and each operation it kills a host in.

Two small repositories are built once (4 MiB images) and copied for every (operation, crash
point) pair, so that each run starts from the same files and log. ``main`` holds a disk with
data, a snapshot of it, and the snapshot's copy in the second repository; ``fixes`` adds what
a merge and a clean fix start from: a disk whose snapshot was removed, a removed disk, and
two orphan volumes. Next to them, ``expected/`` holds what each image must read like.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg
from tests.hosts.hostlib import (
    Auditor,
    HostProcess,
    MiB,
    host_spec,
    log_verifies,
    records,
    settle,
    volume_files,
)

qemu = QemuImg()
REPOS = ("r1", "r2")


@dataclass
class World:
    root: Path  # holds main/ and fixes/, each with r1/, r2/ and expected/
    ids: dict[str, str] = field(default_factory=dict)
    strays: list[str] = field(default_factory=list)  # orphan volume files in fixes/r1
    removed_volume: str = ""  # the removed disk's volume file in fixes/r1
    known: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (template, repo)

    def template(self, name: str) -> Path:
        return self.root / name


def _engine(state_dir: Path) -> StorageEngine:
    return StorageEngine(
        "host-setup", state_dir=str(state_dir), lease_timeout=1.0, poll_interval=0.1
    )


def _write(se: StorageEngine, repo: str, image: str, offset: int, length: int, byte: int) -> None:
    prepared = se.prepare_image(repo, image)
    try:
        qemu.write_pattern(prepared.path, prepared.format, offset, length, byte)
    finally:
        se.teardown_image(repo, image)


def _save_content(se: StorageEngine, repo: str, image: str, path: Path, size: int = 0) -> None:
    """What ``image`` reads like now, flattened into ``path`` (grown to ``size`` if given)."""
    prepared = se.prepare_image(repo, image)
    try:
        qemu.convert(prepared.path, str(path), src_fmt=prepared.format, dst_fmt="qcow2")
    finally:
        se.teardown_image(repo, image)
    if size:
        qemu.resize(str(path), size, fmt="qcow2")


def _connect(se: StorageEngine, base: Path, create: bool) -> None:
    for repo in REPOS:
        path = str(base / repo)
        if create:
            os.mkdir(path)
            se.create_storage_repository("localfs-1.0", {"path": path})
        se.connect_storage_repository(repo, "localfs-1.0", {"path": path})


def build_world(root: Path) -> World:
    world = World(root)
    main = root / "main"
    (main / "expected").mkdir(parents=True)
    ids = world.ids
    with _engine(root / "state-main") as se:
        _connect(se, main, create=True)
        ids["disk"] = se.create_virtual_disk("r1", 4 * MiB)
        se.wait_for_image("r1", ids["disk"], timeout=30)
        _write(se, "r1", ids["disk"], 0, MiB, 0x11)
        ids["snap"] = se.create_snapshot("r1", ids["disk"])
        se.wait_for_image("r1", ids["disk"], timeout=30)
        _write(se, "r1", ids["disk"], MiB, MiB, 0x22)
        se.copy_image("r2", ids["snap"])  # keeps the snapshot's id
        se.wait_for_image("r2", ids["snap"], timeout=30)
        expected = main / "expected"
        _save_content(se, "r1", ids["disk"], expected / "disk.qcow2")
        _save_content(se, "r1", ids["disk"], expected / "disk-grown.qcow2", size=8 * MiB)
        _save_content(se, "r1", ids["snap"], expected / "snap.qcow2")
        qemu.create(str(expected / "blank.qcow2"), "qcow2", 4 * MiB)
    shutil.copytree(main, root / "fixes")
    fixes = root / "fixes"
    with _engine(root / "state-fixes") as se:
        _connect(se, fixes, create=False)
        ids["mdisk"] = se.create_virtual_disk("r1", 4 * MiB)
        se.wait_for_image("r1", ids["mdisk"], timeout=30)
        _write(se, "r1", ids["mdisk"], 0, MiB, 0x33)
        msnap = se.create_snapshot("r1", ids["mdisk"])
        se.wait_for_image("r1", ids["mdisk"], timeout=30)
        _write(se, "r1", ids["mdisk"], 2 * MiB, MiB, 0x44)
        se.remove_image("r1", msnap)
        _save_content(se, "r1", ids["mdisk"], fixes / "expected" / "mdisk.qcow2")
        removed = se.create_virtual_disk("r1", 4 * MiB)
        se.wait_for_image("r1", removed, timeout=30)
        world.removed_volume = os.path.basename(se.prepare_image("r1", removed).path)
        se.teardown_image("r1", removed)
        se.remove_image("r1", removed)
    for _ in range(2):
        stray = f"{uuid.uuid4().hex}.qcow2"
        qemu.create(str(fixes / "r1" / "volumes" / stray), "qcow2", MiB)
        world.strays.append(stray)
    for name in ("main", "fixes"):
        with _engine(root / f"state-{name}") as se:
            _connect(se, world.template(name), create=False)
            for repo in REPOS:
                world.known[name, repo] = {i.image_id for i in se.list_images(repo)}
    return world


# --- the operations -------------------------------------------------------------------------

Check = Callable[[StorageEngine, World, dict[str, str]], None]


@dataclass(frozen=True)
class Operation:
    name: str
    template: str  # "main" or "fixes"
    steps: Callable[[World], list[dict[str, Any]]]
    check: Check
    # A clean is one fix per carrier: A may die before it has started them all, and what it
    # asked for is then whatever it started; the check comes after B's own check + fix.
    checked_after_fixes: bool = False


def new_image(se: StorageEngine, world: World, template: str, repo: str) -> str:
    known = world.known[template, repo]
    found = [i.image_id for i in se.list_images(repo) if i.image_id not in known]
    assert len(found) == 1, f"one new image in {repo}, not {found}"
    return found[0]


def reads_like(se: StorageEngine, repo: str, image: str, expected: Path) -> bool:
    prepared = se.prepare_image(repo, image)
    try:
        return qemu.compare(prepared.path, str(expected), a_fmt=prepared.format, b_fmt="qcow2")
    finally:
        se.teardown_image(repo, image)


def fmt_of(se: StorageEngine, repo: str, image: str) -> str:
    prepared = se.prepare_image(repo, image)
    se.teardown_image(repo, image)
    return prepared.format


def _expect_new(repo: str, content: str, depth: int, fmt: str, template: str = "main") -> Check:
    def check(se: StorageEngine, world: World, paths: dict[str, str]) -> None:
        image = new_image(se, world, template, repo)
        assert se.get_image_status(repo, image).status == "optimized"
        assert se.get_image_info(repo, image).chain_depth == depth
        assert fmt_of(se, repo, image) == fmt
        assert reads_like(se, repo, image, world.template(template) / "expected" / content)

    return check


def _check_snapshot(se: StorageEngine, world: World, paths: dict[str, str]) -> None:
    snapshot = new_image(se, world, "main", "r1")
    expected = world.template("main") / "expected" / "disk.qcow2"
    assert se.get_image_info("r1", snapshot).kind == "snapshot"
    assert reads_like(se, "r1", snapshot, expected)
    disk = world.ids["disk"]
    assert se.get_image_status("r1", disk).status == "optimized"
    assert se.get_image_info("r1", disk).chain_depth == 3  # a new overlay on top
    assert reads_like(se, "r1", disk, expected)


def _check_resize(se: StorageEngine, world: World, paths: dict[str, str]) -> None:
    disk = world.ids["disk"]
    assert se.get_image_info("r1", disk).size == 8 * MiB
    assert se.get_image_status("r1", disk).status == "optimized"
    assert reads_like(se, "r1", disk, world.template("main") / "expected" / "disk-grown.qcow2")


def _check_merge(se: StorageEngine, world: World, paths: dict[str, str]) -> None:
    disk = world.ids["mdisk"]
    assert se.get_image_info("r1", disk).chain_depth == 1  # the removed snapshot's volume left
    assert se.get_image_status("r1", disk).status == "optimized"
    assert reads_like(se, "r1", disk, world.template("fixes") / "expected" / "mdisk.qcow2")


def _check_clean(se: StorageEngine, world: World, paths: dict[str, str]) -> None:
    left = set(os.listdir(os.path.join(paths["r1"], "volumes")))
    assert not left & {*world.strays, world.removed_volume}, left


def _call(method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"call": method, "args": list(args), "kwargs": kwargs}


PERFORMANCE = {"strategy": "performance"}

OPERATIONS = {
    op.name: op
    for op in (
        Operation(
            "create",
            "main",
            lambda w: [_call("create_virtual_disk", "r1", 4 * MiB)],
            _expect_new("r1", "blank.qcow2", 1, "qcow2"),
        ),
        Operation(
            "create-performance",
            "main",
            lambda w: [_call("create_virtual_disk", "r1", 4 * MiB, options=PERFORMANCE)],
            _expect_new("r1", "blank.qcow2", 1, "raw"),
        ),
        Operation(
            "disk-from-snapshot",
            "main",
            lambda w: [_call("create_virtual_disk", "r1", 4 * MiB, w.ids["snap"])],
            _expect_new("r1", "snap.qcow2", 2, "qcow2"),
        ),
        Operation(
            "snapshot",
            "main",
            lambda w: [_call("create_snapshot", "r1", w.ids["disk"])],
            _check_snapshot,
        ),
        Operation(
            "copy",
            "main",
            lambda w: [_call("copy_image", "r2", w.ids["disk"])],
            _expect_new("r2", "disk.qcow2", 1, "qcow2"),
        ),
        Operation(
            "copy-performance",
            "main",
            lambda w: [_call("copy_image", "r2", w.ids["disk"], options=PERFORMANCE)],
            _expect_new("r2", "disk.qcow2", 1, "raw"),
        ),
        Operation(
            "incremental-copy",
            "main",
            lambda w: [_call("copy_image", "r2", w.ids["disk"], w.ids["snap"])],
            _expect_new("r2", "disk.qcow2", 2, "qcow2"),
        ),
        Operation(
            "optimize",
            "main",
            lambda w: [
                _call("create_virtual_disk", "r1", 4 * MiB, w.ids["snap"], options=PERFORMANCE)
            ],
            _expect_new("r1", "snap.qcow2", 1, "raw"),
        ),
        Operation(
            "resize",
            "main",
            lambda w: [_call("resize_virtual_disk", "r1", w.ids["disk"], 8 * MiB)],
            _check_resize,
        ),
        Operation("merge", "fixes", lambda w: [{"fix": "merge", "repo": "r1"}], _check_merge),
        Operation(
            "clean",
            "fixes",
            lambda w: [{"fix": "clean", "repo": "r1"}],
            _check_clean,
            checked_after_fixes=True,
        ),
    )
}


# --- one run: kill host A at a point, let host B finish -------------------------------------


def kill_host_a(world: World, op: Operation, point: str, workdir: Path) -> dict[str, str]:
    """Copy the operation's template to ``workdir``, run the operation on host A with
    ``point`` armed, and return the repositories once A is dead (killed by its crash point,
    then its whole process group, as a fenced machine). A that finishes alive fails."""
    shutil.copytree(world.template(op.template), workdir, symlinks=True)
    paths = {repo: str(workdir / repo) for repo in REPOS}
    steps = [*op.steps(world), {"settle": True, "save": "settled"}]
    a = HostProcess(host_spec("host-a", workdir / "state-a", paths, steps=steps), crash_at=point)
    try:
        died = a.died_of_sigkill(timeout=30)
    finally:
        a.kill()
    assert died, f"host A was not killed at {point}: said {list(a.messages.queue)}"
    return paths


def recover_with_host_b(world: World, op: Operation, paths: dict[str, str], workdir: Path) -> None:
    """Start host B where A died and check all that architecture §5 promises after ``kill -9``."""
    at_kill = {repo: records(path) for repo, path in paths.items()}
    with StorageEngine(
        "host-b", state_dir=str(workdir / "state-b"), lease_timeout=1.0, poll_interval=0.1
    ) as b:
        for repo, path in paths.items():
            b.connect_storage_repository(repo, "localfs-1.0", {"path": path})
        settle(list(paths.values()))
        for repo in REPOS:  # until B's own views have folded what the log says
            for info in b.list_images(repo):
                b.wait_for_image(repo, info.image_id, timeout=30)
        if not op.checked_after_fixes:
            op.check(b, world, paths)  # the state the operation asked for, data identical
        for _ in range(4):  # check + fix until nothing is left to fix
            fixes = [(repo, f) for repo in REPOS for f in b.check_storage_repository(repo)]
            if not fixes:
                break
            assert {f.type for _, f in fixes} <= {"clean", "merge"}, fixes
            for repo, fix in fixes:
                b.fix_storage_repository(repo, fix)
            settle(list(paths.values()))
        else:
            raise AssertionError(f"fixes still offered after four rounds: {fixes}")
        if op.checked_after_fixes:
            op.check(b, world, paths)
    for repo, path in paths.items():
        auditor = Auditor(path)
        try:
            assert auditor.blocked() == []
            files = set(volume_files(path))
            assert files == auditor.live_volumes(), f"leftovers in {repo}: {files}"
        finally:
            auditor.close()
        assert log_verifies(path)
        after = records(path)
        assert after[: len(at_kill[repo])] == at_kill[repo], f"committed records lost in {repo}"
