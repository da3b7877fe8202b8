"""The files of a migration's replica (docs/adr/0029-live-storage-migration.md): the chain
made empty in the destination, immutable volumes copied into it checked, and, after a switch
that a dead host asked for and nobody saw end, the replica's top made to keep every write.

* ``clone`` makes the chain empty in the destination: same ids, formats, sizes and relative
  backing names.
* ``sync`` copies immutable volumes byte for byte (holes kept) into temporary files there,
  checks each against its source with ``qemu-img compare`` (each volume alone), and puts it in
  place of its empty clone.
* :func:`settle`: see its docstring.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``; the
standard library.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import CloneStage, Stage, SyncStage
from engine.errors import (
    InvalidParameter,
    RepositoryNotConnected,
    VolumeFileNotFound,
    VolumeMismatch,
)
from engine.executors import crashpoints as points
from engine.executors.stage_run import Elsewhere, StageRun, Volume, field, local
from engine.formats.repository.driver import RepositoryStorage

logger = logging.getLogger("engine.executors")


def clone(run: StageRun, stage: CloneStage) -> None:
    """The chain, empty, in the destination; a volume there already is left as it is (an
    earlier attempt made it, and a sync may have filled it since)."""
    storage = target_of(run, stage).storage
    for entry in _clone_entries(stage):
        ref, size, backing = entry
        volume = volume_there(storage, ref)
        storage.check_own_file(volume.path)
        if os.path.exists(volume.path):
            continue
        _make_empty(run, storage, volume, size, backing)
    run.crashpoints(points.MIGRATION_AFTER_CLONE)


def sync(run: StageRun, stage: SyncStage) -> None:
    """Copy each volume into the destination, checked, over its clone."""
    storage = target_of(run, stage).storage
    refs = field(stage, "volumes")
    if not isinstance(refs, list):
        raise InvalidParameter(f"a list of volumes, not {refs!r}", name="stage")
    sources = [local(run, ref) for ref in refs]
    sizes = [os.path.getsize(v.path) for v in sources]
    total, before = max(1, sum(sizes)), 0
    for source, size in zip(sources, sizes, strict=True):
        copy_volume(run, storage, source, _progress_from(run, before, total))
        before += size
    run.crashpoints(points.MIGRATION_AFTER_SYNC)


def copy_volume(
    run: StageRun,
    storage: RepositoryStorage,
    source: Volume,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Put a checked copy of ``source`` in place of its volume in ``storage``, unless that
    reads the same already (an earlier attempt copied it)."""
    final = volume_there(storage, source.ref)
    storage.check_own_file(final.path)
    if not os.path.exists(final.path):
        raise VolumeFileNotFound(path=final.path)  # never cloned, or deleted since
    if run.qemu.compare_volumes(source.path, final.path, source.fmt):
        return
    temp = storage.temp_path(source.volume_id, source.fmt, run.tag)
    storage.remove(temp)  # what an earlier attempt of ours left
    storage.copy_in(source.path, temp, progress=progress, cancel=run.cancel)
    if run.cancel is not None and run.cancel.is_set():
        raise run.cancelled(f"cancelled while copying {source.path}")
    if not run.qemu.compare_volumes(source.path, temp, source.fmt):
        raise VolumeMismatch(f"the copy of {source.path} does not read like it", path=temp)
    run.confirm()
    storage.replace(temp, final.path)


def settle(run: StageRun, storage: RepositoryStorage, top: Volume) -> None:
    """The host died between "switch requested" and "switched": only its daemon knew whether
    the switch happened. Write-blocking mirroring put every write acknowledged before the
    switch on both sides, and every write after it on the replica only, but the replica's
    qcow2 metadata may not have been flushed (docs/adr/0029). If both read the same, the
    replica is the image. Otherwise its top becomes the source's top with the replica's
    allocated clusters written over it: no acknowledged write of either side is lost."""
    final = volume_there(storage, top.ref)
    if run.qemu.compare(top.path, final.path):
        return
    if top.fmt != "qcow2":
        return  # raw has no metadata to lose: every acknowledged write is in the replica
    temp = storage.temp_path(top.volume_id, top.fmt, run.tag)
    storage.remove(temp)
    storage.copy_in(top.path, temp, cancel=run.cancel)
    if run.cancel is not None and run.cancel.is_set():
        raise run.cancelled(f"cancelled while copying {top.path}")
    # The replica's top reads the source's copy below it, then is written down into it.
    run.qemu.rebase(
        final.path,
        storage.relative_backing(final.path, temp),
        backing_fmt=top.fmt,
        fmt=top.fmt,
        safe=False,
    )
    run.qemu.commit(final.path, fmt=top.fmt, keep=True, cancel=run.cancel)
    run.confirm()
    storage.replace(temp, final.path)
    logger.warning(
        "image %s: the replica's top and the source's differed after a switch nobody saw end; "
        "the replica now holds the source's top with the replica's writes over it",
        run.image_id,
        extra={"image": str(run.image_id), "operation": run.op_id, "stage": run.index + 1},
    )


def target_of(run: StageRun, stage: Stage) -> Elsewhere:
    root = field(stage, "target")
    if not isinstance(root, str):
        raise InvalidParameter(f"a repository's root, not {root!r}", name="stage")
    found = run.repository_at(root)
    if found is None:
        raise RepositoryNotConnected(repo_id=root)
    return found


def _clone_entries(stage: CloneStage) -> list[tuple[str, int, str | None]]:
    entries: list[tuple[str, int, str | None]] = []
    raw = field(stage, "volumes")
    for entry in raw if isinstance(raw, list) else [raw]:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], int)
            or not (entry[2] is None or isinstance(entry[2], str))
        ):
            raise InvalidParameter(f"[volume, size, backing], not {entry!r}", name="stage")
        entries.append((entry[0], entry[1], entry[2]))
    return entries


def volume_there(storage: RepositoryStorage, ref: str) -> Volume:
    volume_id, fmt = ops.split_ref(ref)
    return Volume(ref, volume_id, fmt, storage.volume_path(volume_id, fmt))


def _make_empty(
    run: StageRun, storage: RepositoryStorage, volume: Volume, size: int, backing: str | None
) -> None:
    temp = storage.temp_path(volume.volume_id, volume.fmt, run.tag)
    storage.remove(temp)
    create_volume(
        run, storage, Volume(volume.ref, volume.volume_id, volume.fmt, temp), size, backing
    )
    run.confirm()
    storage.publish(temp, volume.path)


def create_volume(
    run: StageRun, storage: RepositoryStorage, temp: Volume, size: int, backing: str | None
) -> None:
    """An empty volume at ``temp.path`` reading ``backing`` (a volume of ``storage``)."""
    if backing is None:
        run.qemu.create(temp.path, temp.fmt, size, cancel=run.cancel)
        return
    below = volume_there(storage, backing)
    run.qemu.create(
        temp.path,
        temp.fmt,
        size,
        backing=storage.relative_backing(temp.path, below.path),
        backing_fmt=below.fmt,
        unsafe=True,
        cancel=run.cancel,
    )


def file_size(volume: Volume) -> int:
    return max(1, os.path.getsize(volume.path))


def _progress_from(run: StageRun, before: int, total: int) -> Callable[[int], None]:
    def report(done: int) -> None:
        if done > 0:
            run.crashpoints(points.MIGRATION_MID_SYNC)
        report_progress(run, before + done, total)

    return report


def report_progress(run: StageRun, done: int, total: int) -> None:
    if run.progress is not None:
        run.progress(min(100.0, 100.0 * done / max(1, total)))
