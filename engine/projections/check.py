"""What check_storage_repository offers and what fix_storage_repository starts (architecture §1).

Pure rules over the view's images and the repository's files:

``mend``      release an image's failed, stopped or held operation (its own type when it is an
              ``optimize``, ``clean`` or ``merge``: those leave the data usable);
``optimize``  a ``performance`` virtual disk that is not one raw volume: copy it into one;
``merge``     a volume that live chains go through but that is no live image's own (the top of
              a removed snapshot): rebase each child onto its parent, then chains drop it;
``clean``     files that no live chain, unfinished stage or queued operation needs;
``mend``      (also) a live image whose volume is missing or damaged: made again where the data
              can be had again, else removed, the fix saying the data is lost (ADR 0017); a
              live snapshot's volume, also rotten by a deep check, is mended on the snapshot
              for every image reading it: from a replica in another repository, else by a
              choice the fix offers (engine/projections/snapshot_mends.py, docs/adr/0034).

A foreign file (a link, or a file with a name outside the repository:
engine/formats/repository/driver.py) is never offered to clean, and a volume whose file is foreign
counts as lost. Each one is reported as a ``mend`` whose description says what it is and that a
person must put it right: starting it is refused with :class:`~engine.errors.ForeignFile`, since no
work Strata could do would not write, delete or read through it (docs/adr/0016-links-inside-a-
repository.md).

A migration's replica (an image whose ``replica_of`` is set: docs/adr/0029) is offered no fix:
its volumes are needed, but missing or partial until the migration syncs them, which is expected,
not damage. A replica that was discarded (its migration aborted) is a removed image like any other,
whose files clean frees, though on a new carrier: it takes no work.

Every fix is an operation queued on a *carrier* image. ``optimize`` and ``mend`` run on their
image. A ``merge`` runs on the first (by id) live image whose chain goes through the volume: it
rewrites that image's volumes, so it belongs in its queue, ordered with its other work, visible
in its status and awaited by ``wait_for_image``. A ``clean`` runs on the removed image whose
chain holds the files; files of no image, or of a removed image whose queue is blocked, go to a
new carrier: an image requested and removed in one transaction, seen by nobody but executors.

What a fix's data holds: engine/projections/fix_tokens.py; starting one is a command,
engine/service/fix_handlers.py.

Imports: :mod:`engine.aggregates`, :mod:`engine.errors`, :mod:`engine.types`, the repository
format's file listing (:mod:`engine.formats.repository.driver`) and the projections beside it
(the replicas' rules: :mod:`engine.projections.replicas`).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation
from engine.aggregates.stage_kinds import CopyStage, CreateStage, DeleteStage, Stage
from engine.aggregates.work_rules import BLOCKED, merge_chain_changes, release_type
from engine.errors import ForeignFile
from engine.formats.repository.driver import VolumeFile
from engine.projections.fix_tokens import (
    DATA_VERSION,
    decode_fix,
    digest,
    foreign_file_fix,
    make_fix,
    new_carrier_fix,
)
from engine.projections.replicas import NO_SEARCH, Replica, ReplicaSearch, rotten
from engine.projections.snapshot_mends import snapshot_mends
from engine.projections.volume_needs import VolumeIndex, can_optimize
from engine.types import Fix

if TYPE_CHECKING:
    from engine.projections.view import RepositoryView

_ORDER: dict[str, int] = {ops.MEND: 0, ops.OPTIMIZE: 1, ops.MERGE: 2, ops.CLEAN: 3}


@dataclass(frozen=True, slots=True)
class Problems:
    lost: frozenset[str]  # volumes of live chains that should exist and do not (or are damaged)
    fixes: list[Fix]


# --- check ----------------------------------------------------------------------------------


def find_problems(
    view: RepositoryView,
    files: Iterable[VolumeFile],
    *,
    damaged: Collection[str] = (),
    elsewhere: Collection[str] = (),
    unlisted: ForeignFile | None = None,
    writers: Mapping[str, Operation] | None = None,
    replicas: ReplicaSearch = NO_SEARCH,
) -> Problems:
    """Lost volumes and the fixes worth offering. ``damaged``: volumes a deeper check found
    corrupt; they count as lost, as do those a deep check recorded rotten (docs/adr/0033).
    ``elsewhere``: volumes here that work in other repositories reads (a copy of an image of
    this one): never offered to clean. ``unlisted``: why the files could not be listed at all
    (the volume directory is foreign), when they could not. ``writers``: operations of other
    repositories that write temporary files here (a migration's), by id: whether such a file
    is a leftover is their state's to say. ``replicas``: where the images' copies in other
    repositories are, to mend a snapshot's lost volume from (docs/adr/0034)."""
    on_disk: dict[str, list[VolumeFile]] = {}
    published: set[str] = set()  # volumes with a file that is not a stage's temporary
    foreign: list[_Foreign] = []
    for f in files:
        ref = ops.volume_ref(f.volume_id, f.fmt)
        if f.foreign is not None:
            foreign.append(_Foreign(f.path, f.foreign, ref))
            continue
        on_disk.setdefault(ref, []).append(f)
        if not f.is_temporary:
            published.add(ref)
    if unlisted is not None:
        foreign.append(_Foreign(unlisted.path, unlisted.what, None))
    return _problems(
        view, on_disk, published, damaged, elsewhere, foreign, unlisted is None, writers, replicas
    )


def find_fixes(
    view: RepositoryView,
    files: Iterable[VolumeFile],
    *,
    damaged: Collection[str] = (),
    replicas: ReplicaSearch = NO_SEARCH,
) -> list[Fix]:
    return find_problems(view, files, damaged=damaged, replicas=replicas).fixes


def find_fixes_for_volumes(view: RepositoryView, refs: Iterable[str]) -> list[Fix]:
    """:func:`find_fixes` with a published file for each volume of ``refs`` and nothing else,
    sizes unknown (0): a replay's files, which only the log tells. No file object is made for
    a volume that no clean frees (nearly all of them, in a large repository)."""
    on_disk = _Published(dict.fromkeys(refs))
    return _problems(view, on_disk, on_disk, ()).fixes


class _Published(Mapping[str, list[VolumeFile]]):
    """Published volume files named by their volumes, made when asked for."""

    def __init__(self, refs: dict[str, None]) -> None:
        self._refs = refs

    def __getitem__(self, ref: str) -> list[VolumeFile]:
        if ref not in self._refs:
            raise KeyError(ref)
        volume_id, fmt = ops.split_ref(ref)
        return [VolumeFile(volume_id, fmt, f"volumes/{ref}", 0, 0, False)]

    def __contains__(self, ref: object) -> bool:
        return ref in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)


class _Foreign(NamedTuple):
    path: str
    what: str
    ref: str | None  # the volume it has the name of; None for the volume directory


def _problems(
    view: RepositoryView,
    on_disk: Mapping[str, list[VolumeFile]],
    published: Collection[str],
    damaged: Collection[str],
    elsewhere: Collection[str] = (),
    foreign: Collection[_Foreign] = (),
    listed: bool = True,
    writers: Mapping[str, Operation] | None = None,
    replicas: ReplicaSearch = NO_SEARCH,
) -> Problems:
    index = VolumeIndex(view.images(), elsewhere, writers)
    rot = rotten(view.damaged())
    if rot:
        if not isinstance(damaged, Mapping):
            damaged = {ref: f"volume {ref} is damaged" for ref in damaged}
        damaged = {**rot, **damaged}
    lost = frozenset(
        ref
        for ref in index.live_users
        if ref not in index.pending
        and (ref not in published or ref in damaged)
        and ref not in index.replica_only
    )
    # A volume behind a foreign file, or in a volume directory that could not be listed, may
    # well be whole where a person put it: making it again, or declaring it lost, is not ours
    # to offer until the foreign file is put right.
    behind_foreign = {f.ref for f in foreign if f.ref is not None}
    restorable = frozenset(lost - behind_foreign) if listed else frozenset[str]()
    fixes = [*_releases(index), *_restorations(index, restorable, damaged, replicas)]
    fixes += [*_optimizations(index, lost), *_merges(index, lost)]
    fixes += _cleans(index, on_disk)
    fixes += _foreign_files(index, foreign)
    fixes.sort(key=lambda f: (_ORDER[f.type], f.image_ids, f.data))
    return Problems(lost, fixes)


def _releases(index: VolumeIndex) -> Iterable[Fix]:
    for image in index.images:
        op = image.current_operation()
        if op is None or op.state not in BLOCKED or _replica(image):
            continue
        kind = release_type(image, op, index.needed)
        if kind is None:
            continue
        why = op.error or ("held for a fix (auto_fix=False)" if op.state == ops.HELD else "")
        yield make_fix(
            kind,
            image,
            [image],
            f"{kind} {image.kind} {image.id}: resume its {op.purpose} operation ({why})",
            release=op.op_id,
        )


def _restorations(
    index: VolumeIndex,
    lost: Collection[str],
    damaged: Collection[str],
    replicas: ReplicaSearch = NO_SEARCH,
) -> Iterable[Fix]:
    """A ``mend`` for each idle live image whose chain holds a lost volume (missing, or
    damaged): made again where the data can be had again, else one that says the data is lost
    and removes the image (ADR 0017). An image whose work waits for a fix gets that fix
    (:func:`_releases`) first; one with work pending gets nothing until the work is done.

    A lost volume that is a live snapshot's top is mended on that snapshot, for every image
    whose chain holds it: from a replica in another repository, or, with none, by one of two
    choices the fix offers, remove or accept the loss (docs/adr/0034)."""
    if not lost:
        return
    owners = {
        image.chain[-1]: image
        for image in index.images
        if not image.removed and image.kind == ops.SNAPSHOT and image.chain and not _replica(image)
    }
    for image in index.images:
        if image.removed or image.current_operation() is not None or _replica(image):
            continue
        ref = next((r for r in image.chain if r in lost), None)
        if ref is None:
            continue
        state = "damaged" if ref in damaged else "missing"
        what = f"volume {ref} of {image.kind} {image.id} is {state}"
        if isinstance(damaged, Mapping) and ref in damaged:
            what = f"{damaged[ref]} ({image.kind} {image.id})"
        clear: list[Stage] = [{"do": "delete", "volumes": [ref]}] if state == "damaged" else []
        source = _copied_from(index, image, ref, lost)
        owner = owners.get(ref)
        if source is not None:
            stage: CopyStage = {"do": "copy", "source_image": source.id_text, "volume": ref}
            if ref.endswith(".raw"):
                stage["preallocate"] = True
            yield make_fix(
                ops.MEND,
                image,
                [image, source],
                f"mend {image.kind} {image.id}: {what}; copy it again from snapshot "
                f"{source.id} (no data is lost)",
                stages=[*clear, stage],
            )
        elif owner is not None:
            if owner is image:  # the images above it are mended by the same fix
                yield from snapshot_mends(index, owner, ref, state, clear, replicas)
        elif (
            image.kind == ops.VIRTUAL_DISK
            and len(image.chain) > 1
            and ref == image.chain[-1]
            and ref.endswith(".qcow2")
        ):
            recreate: CreateStage = {
                "do": "create",
                "volume": ref,
                "size": image.size,
                "backing": image.chain[-2],
            }
            yield make_fix(
                ops.MEND,
                image,
                [image],
                f"mend virtual disk {image.id}: {what}; recreate it empty over its base. Data "
                "lost: every write since the disk's last snapshot",
                stages=[*clear, recreate],
            )
        else:
            yield make_fix(
                ops.MEND,
                image,
                [image],
                f"mend {image.kind} {image.id}: {what}, and nothing here can restore it. Data "
                "lost: this fix removes the image (restore it from a backup copy)",
                remove=f"data lost: {what}",
            )


def _copied_from(index: VolumeIndex, image: Image, ref: str, lost: Collection[str]) -> Image | None:
    """The live snapshot of this repository that ``ref`` was copied from, whole: copying it
    again gives the very same data (a snapshot never changes)."""
    for op in image.operations:
        for stage in op.stages[: op.done]:
            if stage["do"] != "copy" or stage.get("volume") != ref:
                continue
            source_id = _uuid(stage.get("source_image"))
            source = None if source_id is None else index.by_id.get(source_id)
            if (
                source is not None
                and not source.removed
                and source.kind == ops.SNAPSHOT
                and source.replica_of is None
                and source.id != image.id
                and source.chain
                and not any(r in lost or r in index.pending for r in source.chain)
            ):
                return source
    return None


def _replica(image: Image) -> bool:
    """A migration's replica: no fix is offered for it, its files are the migration's to make
    (docs/adr/0029)."""
    return image.replica_of is not None and not image.removed


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _optimizations(index: VolumeIndex, lost: Collection[str]) -> Iterable[Fix]:
    for image in index.images:
        if can_optimize(image, lost):
            flat = ops.volume_ref(digest("volume", image.id, len(image.operations)), "raw")
            stage: CopyStage = {
                "do": "copy",
                "source_image": image.id_text,
                "volume": flat,
                "preallocate": True,
                "set_chain": [flat],
            }
            depth = len(image.chain)
            yield make_fix(
                ops.OPTIMIZE,
                image,
                [image],
                f"optimize virtual disk {image.id}: flatten its {depth} volume(s) into one "
                "preallocated raw volume (strategy performance)",
                stages=[stage],
            )


def _merges(index: VolumeIndex, lost: Collection[str]) -> Iterable[Fix]:
    """One merge per family of chains at a time, none in a family a merge already works on:
    in each family, the first candidate by (depth, volume) that may be merged now.

    Family by family, in the order the candidates come (the images' order in memory): the
    families are independent, and the fixes are sorted at the end anyway. A candidate's family
    is its merge's (both are its first live user's base), so a busy one is passed over before
    the merge is worked out: half of a large check's candidates.
    """
    busy = index.merging_families
    families: dict[str, list[tuple[int, str]]] = {}
    for depth, ref, family in index.merge_candidates():
        if family not in busy:
            families.setdefault(family, []).append((depth, ref))
    for candidates in families.values():
        for _, ref in sorted(candidates):
            merge = index.merge_of(ref)
            if merge is None or index.merge_blocker(merge, lost) is not None:
                continue
            carrier = merge.carrier
            yield make_fix(
                ops.MERGE,
                carrier,
                [*merge.users, *merge.owners],
                f"merge volume {merge.volume} of removed image(s) "
                f"{', '.join(o.id_text for o in merge.owners) or '(none)'} into "
                f"{len(merge.children)} child volume(s), shortening {len(merge.users)} chain(s)",
                stages=index.merge_stages(merge, carrier),
            )
            break


def _cleans(index: VolumeIndex, on_disk: Mapping[str, list[VolumeFile]]) -> list[Fix]:
    by_carrier: dict[uuid.UUID | None, list[str]] = {}
    leftovers: list[list[str]] = []  # [volume, tag] of files no attempt will use
    for ref in sorted(on_disk):
        if index.is_needed(ref):
            leftovers += (
                [ref, f.tag]
                for f in on_disk[ref]
                if f.is_temporary and f.tag and index.is_leftover(f.tag)
            )
            continue
        owner = index.clean_owner(ref)
        by_carrier.setdefault(None if owner is None else owner.id, []).append(ref)
    fixes = []
    for key, refs in by_carrier.items():
        size = sum(f.allocated for ref in refs for f in on_disk[ref])
        stages: list[Stage] = [{"do": "delete", "volumes": refs}]
        if key is None:
            what = f"{len(refs)} volume(s) no image needs (leftovers and orphans)"
            fixes.append(new_carrier_fix(f"clean {what}, {size} bytes", stages))
        else:
            owner = index.by_id[key]
            what = f"{len(refs)} volume(s) of removed image {key}, {size} bytes"
            fixes.append(make_fix(ops.CLEAN, owner, [owner], f"clean {what}", stages=stages))
    if leftovers:
        size = sum(f.allocated for ref, tag in leftovers for f in on_disk[ref] if f.tag == tag)
        what = f"{len(leftovers)} temporary file(s) of failed or stopped stages, {size} bytes"
        stage: DeleteStage = {"do": "delete", "volumes": [], "temporaries": leftovers}
        fixes.append(new_carrier_fix(f"clean {what}", [stage]))
    return fixes


def _foreign_files(index: VolumeIndex, foreign: Iterable[_Foreign]) -> Iterable[Fix]:
    for f in foreign:
        if f.ref is None:
            users: list[Image] = []
            what = "the volume directory; every volume is out of reach until it is put right"
        else:
            users = [*index.live_users.get(f.ref, ()), *index.removed_users.get(f.ref, ())]
            whose = ", ".join(i.id_text for i in users) or "no image"
            what = f"the file of volume {f.ref} ({whose})"
        yield foreign_file_fix(
            f.path,
            f.what,
            users,
            f"foreign file {f.path}, {what}: {f.what}. Strata never follows a link inside a "
            "repository and does nothing to it: put the repository's own file in its place or "
            "remove it by hand, then check again",
        )


__all__ = [
    "DATA_VERSION",
    "NO_SEARCH",
    "Problems",
    "Replica",
    "ReplicaSearch",
    "decode_fix",
    "find_fixes",
    "find_fixes_for_volumes",
    "find_problems",
    "merge_chain_changes",
    "release_type",
]
