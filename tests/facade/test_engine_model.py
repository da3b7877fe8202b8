"""The facade against a plain model: random sequences of calls, then status and content checked.

Hypothesis drives a :class:`~hypothesis.stateful.RuleBasedStateMachine` through the calls a
management engine makes (create, write through ``prepare_image``, snapshot, disks from snapshots
in either repository, full and incremental copies, remove, user data, grow, check and fix until
nothing is offered, and a restart that replays the log alone). The model is a dict of images,
each with its repository, kind, size in MiB, user data and which byte every written MiB holds.

After every step each model image must be listed with the model's kind, size and user data, be
``optimized`` once its work is done, and read exactly as the model says: the whole disk is
compared (``qemu-img compare``) with a raw file built from the model, and the images the step
touched are also read region by region with ``holds`` (written regions and unwritten zeroes).
Removed images must be gone. After check and fix, every file in ``<repo>/volumes`` belongs to a
live image's chain.

Bugs the model found are pinned by the plain tests at the end of this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine import StorageEngine
from engine.errors import ImageNotFound
from engine.formats.qemu.image_tools import QemuImg
from tests.facade.images import MiB, holds, write

DISK, SNAPSHOT = "virtual-disk", "snapshot"
REPOS = ("r1", "r2")
MAX_MIB = 10  # disks are created with 4-8 MiB and grow to at most this
WAIT = 30.0  # seconds: no step on these small disks comes near it; a hang fails, not blocks
FIX_ROUNDS = 12

repos = st.sampled_from(REPOS)
strategies = st.sampled_from(("space", "performance"))
patterns = st.integers(1, 255)  # 0 is what unwritten regions read
user_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what msgpack encodes, SQLite's int64 included
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=4,
)


@dataclass
class ModelImage:
    label: str  # "disk3@r1": the name a reproduction prints (ids are random UUIDs)
    repo: str
    image_id: str
    kind: str
    size_mib: int
    content: dict[int, int] = field(default_factory=dict)  # MiB index -> byte written there
    user_data: Any = None
    copy_of: str | None = None  # the image id this is a (full or incremental) copy of

    @property
    def size(self) -> int:
        return self.size_mib * MiB

    def runs(self) -> list[tuple[int, int, int]]:
        """(first MiB, MiB count, byte) of each stretch that reads one byte, zeroes included."""
        found: list[tuple[int, int, int]] = []
        for mib in range(self.size_mib):
            byte = self.content.get(mib, 0)
            if found and found[-1][2] == byte:
                start, length, _ = found[-1]
                found[-1] = (start, length + 1, byte)
            else:
                found.append((mib, 1, byte))
        return found


class EngineModel(RuleBasedStateMachine):
    """One host on two fresh repositories per example; the model is ``self.images``."""

    def __init__(self) -> None:
        super().__init__()
        self.qemu = QemuImg()
        self.root = tempfile.mkdtemp(prefix="strata-model-")
        self.paths = {name: os.path.join(self.root, name) for name in REPOS}
        self.images: dict[str, ModelImage] = {}  # by label, in creation order
        self.removed: set[tuple[str, str]] = set()  # (repo, image id), never to come back
        self.names: dict[str, str] = {}  # image id -> "disk3", shared by copies keeping the id
        self.touched: set[str] = set()
        self.state_dirs = 0
        self.engine = StorageEngine("host-a", state_dir=self._new_state_dir(), poll_interval=0.1)
        for name, path in self.paths.items():
            os.mkdir(path)
            self.engine.create_storage_repository("localfs-1.0", {"path": path})
            self.engine.connect_storage_repository(name, "localfs-1.0", {"path": path})

    def teardown(self) -> None:
        try:
            self.engine.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- the model ------------------------------------------------------------------------

    def _new_state_dir(self) -> str:
        self.state_dirs += 1
        return os.path.join(self.root, f"state-{self.state_dirs}")

    def _add(self, repo: str, image_id: str, kind: str, size_mib: int, **kw: Any) -> ModelImage:
        name = self.names.setdefault(
            image_id, f"{'disk' if kind == DISK else 'snap'}{len(self.names)}"
        )
        image = ModelImage(f"{name}@{repo}", repo, image_id, kind, size_mib, **kw)
        assert image.label not in self.images, f"{image.label} is already live"
        assert (repo, image_id) not in self.removed, f"{image.label} was removed and came back"
        self.images[image.label] = image
        self.touched.add(image.label)
        note(f"{image.label} = {image_id}")
        return image

    def _live(self, repo: str, image_id: str) -> ModelImage | None:
        return self.images.get(f"{self.names.get(image_id)}@{repo}")

    def _local_snapshot(self, repo: str, snapshot_id: str) -> ModelImage | None:
        """What a disk on the snapshot builds on in ``repo`` without copying it there again:
        the snapshot under its own id, or, once that id was removed here, a live copy of it
        made under another id."""
        here = self._live(repo, snapshot_id)
        if here is not None or (repo, snapshot_id) not in self.removed:
            return here
        copies = (
            i for i in self.images.values()
            if i.repo == repo and i.kind == SNAPSHOT and i.copy_of == snapshot_id
        )  # fmt: skip
        return next(copies, None)

    def _found(self, image_id: str) -> ModelImage:
        """The image a call finds by id alone: the first connected repository holding it."""
        found = [i for r in REPOS if (i := self._live(r, image_id)) is not None]
        return found[0]

    def _pick(self, data: st.DataObject, *kinds: str, growable: bool = False) -> ModelImage:
        labels = [
            label
            for label, i in self.images.items()
            if i.kind in kinds and (not growable or i.size_mib < MAX_MIB)
        ]
        return self.images[data.draw(st.sampled_from(labels), label=" or ".join(kinds))]

    def _has(self, kind: str, *, growable: bool = False) -> bool:
        return any(
            i.kind == kind and (not growable or i.size_mib < MAX_MIB) for i in self.images.values()
        )

    def _incremental_bases(self) -> list[tuple[str, str]]:
        """(source, base): a live earlier copy of a live image, in another repository."""
        return [
            (source.label, base.label)
            for base in self.images.values()
            if base.copy_of is not None
            for source in self.images.values()
            if source.image_id == base.copy_of and source.repo != base.repo
        ]

    # --- creating images ------------------------------------------------------------------

    @initialize(
        repo=repos,
        size_mib=st.integers(4, 8),
        strategy=strategies,
        pattern=st.none() | patterns,
        snapshot=st.booleans(),
    )
    def start_with_a_disk(
        self, repo: str, size_mib: int, strategy: str, pattern: int | None, snapshot: bool
    ) -> None:
        """A disk (written, snapshotted) to start from, so that the rules that need images can
        run from the first step and the snapshot stories fit into short runs."""
        disk = self._create_blank_disk(repo, size_mib, strategy, None)
        if pattern is not None:
            self.engine.wait_for_image(repo, disk.image_id, timeout=WAIT)  # broken until made
            self._write(disk, 0, 1, pattern)
        if snapshot:
            self._snapshot(disk, None)

    @rule(repo=repos, size_mib=st.integers(4, 8), strategy=strategies, data=user_data)
    def create_blank_disk(self, repo: str, size_mib: int, strategy: str, data: Any) -> None:
        self._create_blank_disk(repo, size_mib, strategy, data)

    def _create_blank_disk(self, repo: str, size_mib: int, strategy: str, data: Any) -> ModelImage:
        disk = self.engine.create_virtual_disk(
            repo, size_mib * MiB, user_data=data, options={"strategy": strategy}
        )
        return self._add(repo, disk, DISK, size_mib, user_data=data)

    @precondition(lambda self: self._has(DISK))
    @rule(data=st.data(), pattern=patterns)
    def write_a_pattern(self, data: st.DataObject, pattern: int) -> None:
        disk = self._pick(data, DISK)
        first = data.draw(st.integers(0, disk.size_mib - 1), label="first MiB")
        count = data.draw(st.integers(1, min(3, disk.size_mib - first)), label="MiB count")
        self._write(disk, first, count, pattern)

    def _write(self, disk: ModelImage, first: int, count: int, pattern: int) -> None:
        write(self.engine, self.qemu, disk.repo, disk.image_id, first * MiB, count * MiB, pattern)
        disk.content.update(dict.fromkeys(range(first, first + count), pattern))
        self.touched.add(disk.label)

    @precondition(lambda self: self._has(DISK))
    @rule(data=st.data(), snapshot_data=user_data)
    def snapshot_a_disk(self, data: st.DataObject, snapshot_data: Any) -> None:
        self._snapshot(self._pick(data, DISK), snapshot_data)

    def _snapshot(self, disk: ModelImage, snapshot_data: Any) -> None:
        snap = self.engine.create_snapshot(disk.repo, disk.image_id, user_data=snapshot_data)
        self._add(
            disk.repo, snap, SNAPSHOT, disk.size_mib,
            content=dict(disk.content), user_data=snapshot_data,
        )  # fmt: skip
        self.touched.add(disk.label)

    @precondition(lambda self: self._has(SNAPSHOT))
    @rule(
        data=st.data(),
        repo=repos,
        extra_mib=st.integers(0, 2),
        strategy=strategies,
        disk_data=user_data,
    )
    def create_a_disk_from_a_snapshot(
        self, data: st.DataObject, repo: str, extra_mib: int, strategy: str, disk_data: Any
    ) -> None:
        snap = self._pick(data, SNAPSHOT)
        source = self._found(snap.image_id)
        before = {i.image_id for i in self.engine.list_images(repo)}
        disk = self.engine.create_virtual_disk(
            repo,
            (snap.size_mib + extra_mib) * MiB,
            base_snapshot_id=snap.image_id,
            user_data=disk_data,
            options={"strategy": strategy},
        )
        made = {i.image_id for i in self.engine.list_images(repo)} - before - {disk}
        if self._local_snapshot(repo, snap.image_id) is not None:
            assert not made, f"a disk on {snap.label} in {repo} also made {made}"
        else:
            # Chains stay in their repository (ADR 0004): the snapshot is copied here first, as
            # a snapshot users see, under its own id unless that id was used here before.
            assert len(made) == 1, f"a disk on {snap.label} in {repo} made {made} besides"
            (copy,) = made
            if (repo, snap.image_id) not in self.removed:
                assert copy == snap.image_id, f"the copy of {snap.label} in {repo} got a new id"
            self._add(
                repo, copy, SNAPSHOT, snap.size_mib,
                content=dict(snap.content), user_data=source.user_data, copy_of=snap.image_id,
            )  # fmt: skip
        self._add(
            repo, disk, DISK, snap.size_mib + extra_mib,
            content=dict(snap.content), user_data=disk_data,
        )  # fmt: skip

    @precondition(lambda self: bool(self.images))
    @rule(data=st.data(), strategy=strategies, copy_data=st.none() | user_data)
    def copy_an_image_to_the_other_repository(
        self, data: st.DataObject, strategy: str, copy_data: Any
    ) -> None:
        image = self._pick(data, DISK, SNAPSHOT)
        target = REPOS[1 - REPOS.index(image.repo)]
        source = self._found(image.image_id)
        copy = self.engine.copy_image(
            target, image.image_id, user_data=copy_data, options={"strategy": strategy}
        )
        here = self._live(target, image.image_id)
        if copy == image.image_id:
            assert source.kind == SNAPSHOT, f"a copy of {source.label} kept its id"
            if here is not None:
                return  # the same immutable content is already there
        elif source.kind == SNAPSHOT and source.repo != target:
            # Seed 000 lets a snapshot's copy keep its id; the engine does unless that id is
            # taken in the target (live or removed).
            assert (target, image.image_id) in self.removed, (
                f"a copy of snapshot {source.label} to {target} got a new id"
            )
        self._add(
            target, copy, source.kind, source.size_mib, content=dict(source.content),
            user_data=source.user_data if copy_data is None else copy_data,
            copy_of=image.image_id,
        )  # fmt: skip

    @precondition(lambda self: bool(self._incremental_bases()))
    @rule(data=st.data(), strategy=strategies, copy_data=st.none() | user_data)
    def copy_incrementally_onto_an_earlier_copy(
        self, data: st.DataObject, strategy: str, copy_data: Any
    ) -> None:
        source_label, base_label = data.draw(
            st.sampled_from(self._incremental_bases()), label="(source, base)"
        )
        source = self._found(self.images[source_label].image_id)
        base = self.images[base_label]
        copy = self.engine.copy_image(
            base.repo,
            source.image_id,
            base_image_id=base.image_id,
            user_data=copy_data,
            options={"strategy": strategy},
        )
        assert copy not in (source.image_id, base.image_id)
        event(f"incremental copy of a {source.kind} onto a {base.kind}")
        self._add(
            base.repo, copy, source.kind, source.size_mib, content=dict(source.content),
            user_data=source.user_data if copy_data is None else copy_data,
            copy_of=source.image_id,
        )  # fmt: skip
        self.touched.add(base.label)

    # --- changing and removing ------------------------------------------------------------

    @precondition(lambda self: self._has(DISK))
    @rule(data=st.data(), then_fix=st.booleans())
    def remove_a_virtual_disk(self, data: st.DataObject, then_fix: bool) -> None:
        self._remove(self._pick(data, DISK), then_fix)  # never left prepared by these rules

    @precondition(lambda self: self._has(SNAPSHOT))
    @rule(data=st.data(), then_fix=st.booleans())
    def remove_a_snapshot(self, data: st.DataObject, then_fix: bool) -> None:
        """Often one that disks go through: its own disk's older data, or clones' base."""
        self._remove(self._pick(data, SNAPSHOT), then_fix)

    def _remove(self, image: ModelImage, then_fix: bool) -> None:
        """``then_fix`` runs the repairs at once, so that the merges and cleans a removal
        needs come up often in short runs."""
        self.engine.remove_image(image.repo, image.image_id)
        event(f"remove a {image.kind}")
        del self.images[image.label]
        self.removed.add((image.repo, image.image_id))
        if then_fix:
            self.check_and_fix_until_nothing_is_offered(image.repo)

    @precondition(lambda self: bool(self.images))
    @rule(data=st.data(), new_data=user_data)
    def set_user_data(self, data: st.DataObject, new_data: Any) -> None:
        image = self._pick(data, DISK, SNAPSHOT)
        self.engine.set_user_data(image.repo, image.image_id, new_data)
        image.user_data = new_data

    @precondition(lambda self: self._has(DISK, growable=True))
    @rule(data=st.data())
    def grow_a_disk(self, data: st.DataObject) -> None:
        disk = self._pick(data, DISK, growable=True)
        new = data.draw(st.integers(disk.size_mib + 1, MAX_MIB), label="new size MiB")
        self.engine.resize_virtual_disk(disk.repo, disk.image_id, new * MiB)
        disk.size_mib = new
        self.touched.add(disk.label)

    # --- repairs and restarts -------------------------------------------------------------

    @rule(repo=repos)
    def check_and_fix_until_nothing_is_offered(self, repo: str) -> None:
        for _ in range(FIX_ROUNDS):
            self._wait_for_all()
            fixes = self.engine.check_storage_repository(repo)
            if not fixes:
                break
            note(f"fixes in {repo}: {[(f.type, f.description) for f in fixes]}")
            for fix in fixes:
                event(f"fix: {fix.type}")
                self.engine.fix_storage_repository(repo, fix)
                for image_id in fix.image_ids:
                    # A removed image carries clean and merge work that users do not see.
                    with contextlib.suppress(ImageNotFound):
                        self.engine.wait_for_image(repo, image_id, timeout=WAIT)
        else:
            raise AssertionError(f"fixes kept coming in {repo}: {fixes}")
        # Clean work runs on removed images, which nobody can wait for: give it time to finish.
        deadline = time.monotonic() + WAIT
        while True:
            files, referenced = self._volume_files(repo), self._referenced_volumes(repo)
            if files == referenced or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert files == referenced, (
            f"unreferenced in {repo}: {sorted(files - referenced)}; "
            f"missing: {sorted(referenced - files)}"
        )
        assert self.engine.check_storage_repository(repo) == []

    @rule()
    def reopen_from_the_log_alone(self) -> None:
        """A restart of this host with an empty state directory: every view is rebuilt."""
        self._reopen(self._new_state_dir())

    @rule()
    def restart_with_the_same_state_directory(self) -> None:
        self._reopen(os.path.join(self.root, f"state-{self.state_dirs}"))

    def _reopen(self, state_dir: str) -> None:
        self.engine.close()
        self.engine = StorageEngine("host-a", state_dir=state_dir, poll_interval=0.1)
        for name, path in self.paths.items():
            self.engine.connect_storage_repository(name, "localfs-1.0", {"path": path})

    # --- what must hold after every step --------------------------------------------------

    @invariant()
    def images_read_and_report_as_the_model_says(self) -> None:
        self._wait_for_all()
        for repo in REPOS:
            listed = {i.image_id: i for i in self.engine.list_images(repo)}
            expected = {i.image_id: i for i in self.images.values() if i.repo == repo}
            assert set(listed) == set(expected), (
                f"{repo} lists unexpected {sorted(set(listed) - set(expected))}, "
                f"lacks {[expected[i].label for i in set(expected) - set(listed)]}"
            )
            for image_id, image in expected.items():
                info = listed[image_id]
                assert (info.kind, info.size, info.user_data) == (
                    image.kind, image.size, image.user_data,
                ), image.label  # fmt: skip
                assert self.engine.get_image_info(repo, image_id) == info
        for image in self.images.values():
            status = self.engine.get_image_status(image.repo, image.image_id)
            assert status.status == "optimized", (image.label, status)
            self._reads_as_modelled(image, region_by_region=image.label in self.touched)
        self.touched.clear()

    @invariant()
    def removed_images_are_gone(self) -> None:
        for repo, image_id in self.removed:
            if self._live(repo, image_id) is None:
                with pytest.raises(ImageNotFound):
                    self.engine.get_image_status(repo, image_id)

    def _wait_for_all(self) -> None:
        for image in self.images.values():
            self.engine.wait_for_image(image.repo, image.image_id, timeout=WAIT)

    def _reads_as_modelled(self, image: ModelImage, *, region_by_region: bool) -> None:
        expected = os.path.join(self.root, "expected.raw")
        with open(expected, "wb") as f:
            f.truncate(image.size)
            for mib, byte in image.content.items():
                f.seek(mib * MiB)
                f.write(bytes([byte]) * MiB)
        prepared = self.engine.prepare_image(image.repo, image.image_id)
        try:
            assert prepared.readonly == (image.kind == SNAPSHOT), image.label
            top = self.qemu.info(prepared.path, fmt=prepared.format)
            assert top["virtual-size"] == image.size, (image.label, top["virtual-size"])
            same = self.qemu.compare(expected, prepared.path, a_fmt="raw", b_fmt=prepared.format)
            assert same, f"{image.label} does not read as the model: {image.runs()}"
        finally:
            self.engine.teardown_image(image.repo, image.image_id)
        if region_by_region:  # what the step touched, read as a virtual machine would
            for first, count, byte in image.runs():
                assert holds(
                    self.engine, self.qemu, image.repo, image.image_id,
                    first * MiB, count * MiB, byte,
                ), (image.label, first, count, byte)  # fmt: skip

    def _volume_files(self, repo: str) -> set[str]:
        return set(os.listdir(os.path.join(self.paths[repo], "volumes")))

    def _referenced_volumes(self, repo: str) -> set[str]:
        """Every file the live images of ``repo`` read through, as qemu-img follows them."""
        names = set()
        for image in self.images.values():
            if image.repo != repo:
                continue
            prepared = self.engine.prepare_image(repo, image.image_id)
            try:
                chain = self.qemu.info(prepared.path, chain=True, fmt=prepared.format)
            finally:
                self.engine.teardown_image(repo, image.image_id)
            for volume in chain:
                path = os.path.realpath(volume["filename"])
                assert os.path.dirname(path) == os.path.realpath(
                    os.path.join(self.paths[repo], "volumes")
                ), f"{image.label} reads {path}, outside its repository"
                names.add(os.path.basename(path))
        return names


TestTheFacadeAgainstAModel = EngineModel.TestCase
TestTheFacadeAgainstAModel.settings = settings(
    max_examples=15,
    stateful_step_count=15,
    deadline=None,
    # The explain phase re-runs a failing case many times over (minutes with qemu-img in every
    # step) to point at lines; the shrunk steps and their notes already tell the story.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


# --- bugs the model found, each pinned by its smallest story ----------------------------------


def test_a_snapshot_copied_into_the_first_connected_repository_is_made(
    engine: StorageEngine,
) -> None:
    """A copy that keeps its id must not find itself as its source (it waited for ever). The
    same hang hit create_virtual_disk("r1", base_snapshot_id=<a snapshot in r2>), whose local
    copy of the snapshot keeps its id too."""
    disk = engine.create_virtual_disk("r2", 4 * MiB)
    snap = engine.create_snapshot("r2", disk)
    engine.wait_for_image("r2", snap, timeout=30)
    copy = engine.copy_image("r1", snap)  # r1 was connected first
    assert copy == snap
    assert engine.wait_for_image("r1", copy, timeout=15).status == "optimized"


def test_an_incremental_copy_with_the_performance_strategy_ends_optimized(
    engine: StorageEngine,
) -> None:
    """Regression: an incremental copy ignored the performance strategy and stayed degraded."""
    disk = engine.create_virtual_disk("r1", 4 * MiB)
    full = engine.copy_image("r2", disk)
    engine.wait_for_image("r2", full, timeout=30)
    diff = engine.copy_image("r2", disk, base_image_id=full, options={"strategy": "performance"})
    assert engine.wait_for_image("r2", diff, timeout=30).status == "optimized"


def test_a_disk_can_be_based_on_a_snapshot_whose_local_copy_was_removed_and_cleaned(
    engine: StorageEngine, repo_paths: tuple[str, str]
) -> None:
    """Regression: a removed local copy of a snapshot blocked disks on it in its repository."""
    disk = engine.create_virtual_disk("r1", 4 * MiB)
    snap = engine.create_snapshot("r1", disk)
    engine.wait_for_image("r1", snap, timeout=30)
    assert engine.copy_image("r2", snap) == snap  # the copy in r2 keeps the snapshot's id
    engine.wait_for_image("r2", snap, timeout=30)
    engine.remove_image("r2", snap)
    for fix in engine.check_storage_repository("r2"):
        engine.fix_storage_repository("r2", fix)
    deadline = time.monotonic() + 30
    while os.listdir(os.path.join(repo_paths[1], "volumes")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.check_storage_repository("r2") == []
    clone = engine.create_virtual_disk("r2", 4 * MiB, base_snapshot_id=snap)
    assert engine.wait_for_image("r2", clone, timeout=30).status == "optimized"
