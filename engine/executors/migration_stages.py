"""A live storage migration's stages: the image's chain copied into another repository, where
a replica of the same id waits, and the switch to it (docs/adr/0029-live-storage-migration.md).

* ``clone`` makes the chain empty in the destination: same ids, formats, sizes and relative
  backing names.
* ``sync`` copies immutable volumes byte for byte (holes kept) into temporary files there,
  checks each against its source with ``qemu-img compare`` (each volume alone), and puts it in
  place of its empty clone.
* ``mirror`` (live only) makes the replica's top an empty clone, opens it in this host's
  daemon on the replica's volumes below (read-only) when they are synced, alone otherwise, and
  starts ``blockdev-mirror`` (``sync: top``, write-blocking) from the image's top into it. The
  job is named after the image and outlives the stage.
* ``switch``, live: a mirror whose target was opened alone (started before the sync, in seed
  003's order) is cancelled gently and started again on the synced chain, since QEMU cannot
  safely take a backing under a target the guest writes through; then it waits for ``ready``,
  records ``StageReached("switch requested")``, asks for ``job-complete``; once QEMU reports the
  job complete the replica's log records ``ReplicaSwitched`` and the stage's completion removes
  the image here. Offline (the image detached, or its host dead): before "switch requested"
  the source is what the virtual machine wrote, and the top is copied like any volume; after
  it, see :func:`settle`.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``, the
attachment names of ``engine.service``; the standard library.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CloneStage, MirrorStage, Stage, SwitchStage, SyncStage
from engine.aggregates.work_rules import synced_volumes
from engine.errors import (
    DaemonError,
    InvalidParameter,
    ReplicationSwitchFailed,
    RepositoryNotConnected,
    VolumeFileNotFound,
    VolumeMismatch,
)
from engine.executors import crashpoints as points
from engine.executors import live_stages
from engine.executors.stage_run import Elsewhere, Live, StageRun, Volume, field, local
from engine.formats.qemu.storage_daemon import ChainVolume, StorageDaemon
from engine.formats.repository.driver import RepositoryStorage
from engine.service.attachments import export_name, mirror_job_name, volume_of

logger = logging.getLogger("engine.executors")

MIRRORING = "mirroring"  # the mirror job is being started
SWITCH_REQUESTED = "switch requested"  # job-complete is being asked for
POLL = 0.05


def execute(run: StageRun) -> None:
    """Run any stage: a migration's here, the others live or offline (live_stages)."""
    stage = run.stage
    if stage["do"] == "clone":
        clone(run, stage)
    elif stage["do"] == "sync":
        sync(run, stage)
    elif stage["do"] == "mirror":
        mirror(run, stage)
    elif stage["do"] == "switch":
        switch(run, stage)
    else:
        live_stages.execute(run)


# --- clone and sync -------------------------------------------------------------------------


def clone(run: StageRun, stage: CloneStage) -> None:
    """The chain, empty, in the destination; a volume there already is left as it is (an
    earlier attempt made it, and a sync may have filled it since)."""
    storage = _target(run, stage).storage
    for entry in _clone_entries(stage):
        ref, size, backing = entry
        volume = _there(storage, ref)
        storage.check_own_file(volume.path)
        if os.path.exists(volume.path):
            continue
        _make_empty(run, storage, volume, size, backing)
    run.crashpoints(points.MIGRATION_AFTER_CLONE)


def sync(run: StageRun, stage: SyncStage) -> None:
    """Copy each volume into the destination, checked, over its clone."""
    storage = _target(run, stage).storage
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
    final = _there(storage, source.ref)
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


# --- mirror and switch ----------------------------------------------------------------------


def mirror(run: StageRun, stage: MirrorStage) -> None:
    """Start mirroring the image's top into the replica's, unless the job runs already.
    Offline there is nothing to mirror from: the switch copies the top."""
    live = run.live
    if live is not None and live.daemon.find_job(mirror_job_name(live.image.id)) is None:
        _start_mirror(run, live, _target(run, stage), local(run, field(stage, "volume")))


def switch(run: StageRun, stage: SwitchStage) -> None:
    target = _target(run, stage)
    replica = target.image(run.image_id)
    if replica is None or replica.removed:
        raise ReplicationSwitchFailed(
            f"its replica in {target.storage.root} is gone (the migration was aborted)",
            image_id=run.image_id,
        )
    if replica.replica_of is None:
        return  # switched by an earlier attempt: the completion removes the image here
    top = local(run, field(stage, "volume"))
    live = run.live
    if live is not None:
        _switch_live(run, live, target, top)
    elif run.phase == SWITCH_REQUESTED:
        settle(run, target.storage, top)
    else:
        # The source holds every write: the replica's top, a mirror's partial copy, goes.
        copy_volume(run, target.storage, top, lambda done: _report(run, done, _size(top)))
    run.confirm()
    if live is not None:
        run.crashpoints(points.MIGRATION_BEFORE_SWITCHED)
    merge = stage.get("merge")
    operations = [] if not merge else [_merge_plan(run.op_id, merge, replica.chain)]

    def switched(image: Image, host_id: str, now: datetime) -> None:
        image.switch_replica(
            attached=live is not None, operations=operations, host_id=host_id, now=now
        )

    target.update(run.image_id, switched)
    run.crashpoints(points.MIGRATION_AFTER_SWITCHED)
    logger.info(
        "image %s switched to its replica in %s (%s)",
        run.image_id, target.storage.root, "live" if live is not None else "offline",
        extra={"image": str(run.image_id), "operation": run.op_id, "stage": run.index + 1},
    )  # fmt: skip
    if live is not None:
        # The source's nodes serve nobody now: closed, so that clean can free their files.
        image = live.image
        for ref in reversed(image.chain):
            node = volume_of(image, ref, local(run, ref).path).node
            with suppress(DaemonError):
                live.daemon.remove_nodes([node])


def settle(run: StageRun, storage: RepositoryStorage, top: Volume) -> None:
    """The host died between "switch requested" and "switched": only its daemon knew whether
    the switch happened. Write-blocking mirroring put every write acknowledged before the
    switch on both sides, and every write after it on the replica only, but the replica's
    qcow2 metadata may not have been flushed (docs/adr/0029). If both read the same, the
    replica is the image. Otherwise its top becomes the source's top with the replica's
    allocated clusters written over it: no acknowledged write of either side is lost."""
    final = _there(storage, top.ref)
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


def _switch_live(run: StageRun, live: Live, target: Elsewhere, top: Volume) -> None:
    daemon, image = live.daemon, live.image
    job = mirror_job_name(image.id)
    replica_top = _node_there(image, target.storage, top.ref)
    if daemon.export_node(export_name(image.id)) == replica_top.node:
        daemon_job = daemon.find_job(job)
        if daemon_job is not None:
            daemon.dismiss_job(daemon_job.id)
        return  # QEMU switched for an earlier attempt
    running = daemon.find_job(job)
    if running is not None and run.phase != SWITCH_REQUESTED and not _on_its_chain(live, target):
        # Started before the volumes below were synced (seed 003's order), so opened with no
        # backing; QEMU cannot take a backing under a mirror's target safely while the guest
        # writes through it (a write landing during the reopen was lost): a new mirror, into
        # a top opened on the synced volumes, replaces it.
        daemon.stop_job(running.id)
        run.crashpoints(points.MIGRATION_AFTER_CANCEL)
        running = None
    if running is None:
        _start_mirror(run, live, target, top)
    _follow(run, daemon, job, replica_top.node)


def _start_mirror(run: StageRun, live: Live, target: Elsewhere, top: Volume) -> None:
    daemon, image = live.daemon, live.image
    source_node = daemon.export_node(export_name(image.id))
    if source_node is None:
        raise live_stages._said(daemon, "query-block-exports", f"image {image.id} is not exported")
    replica_top = _node_there(image, target.storage, top.ref)
    if source_node == replica_top.node:
        return
    chain = image.chain
    below = chain[: chain.index(top.ref)] if top.ref in chain else []
    # The volumes below, if synced, are opened read-only under the top: the export reads
    # them once it switches. Not synced yet, the top is opened alone and the switch starts a
    # mirror again once they are (never a backing linked under a running mirror's target).
    lower = (
        [_node_there(image, target.storage, ref) for ref in below]
        if below and set(below) <= synced_volumes(image)
        else []
    )
    for node in (replica_top, *reversed(lower)):  # what an earlier attempt opened
        if live_stages._has_node(daemon, node.node):
            with suppress(DaemonError):
                daemon.remove_nodes([node.node])
    # What an earlier mirror (of a daemon that died) left in the replica's top may be data the
    # source's top no longer holds there: the mirror starts from an empty clone.
    replica = _there(target.storage, top.ref)
    temp = target.storage.temp_path(top.volume_id, top.fmt, run.tag)
    target.storage.remove(temp)
    backing = below[-1] if below else None
    _create(run, target.storage, Volume(top.ref, top.volume_id, top.fmt, temp), image.size, backing)
    run.confirm()
    if os.path.exists(replica.path):
        target.storage.replace(temp, replica.path)
    else:
        target.storage.publish(temp, replica.path)
    live.reach(MIRRORING)
    try:
        daemon.add_chain([*lower, replica_top], read_only=False)
        daemon.mirror(mirror_job_name(image.id), source_node, target_node=replica_top.node)
    except DaemonError:
        if not run.moved_on():
            raise  # else an abort closed the nodes under it: cleaned below
    if run.moved_on():
        # An abort ended the claim meanwhile: it records first, then stops the mirror and
        # closes the replica's nodes it finds (engine/service/migration_handlers.py), maybe
        # before this one began. Seen here, so undone here; after this check the abort finds
        # the job itself.
        daemon.stop_job(mirror_job_name(image.id))
        for node in (replica_top, *reversed(lower)):
            with suppress(DaemonError):
                daemon.remove_nodes([node.node])
        raise run.cancelled("the claim moved on (an abort) as its mirror started")
    run.crashpoints(points.MIGRATION_MIRRORING)
    logger.info(
        "image %s: mirroring %s into %s%s", image.id, top.path, replica.path,
        "" if lower or not below else " (opened alone: the volumes below are not synced yet)",
        extra={"image": str(image.id), "operation": run.op_id, "stage": run.index + 1},
    )  # fmt: skip


def _on_its_chain(live: Live, target: Elsewhere) -> bool:
    """Whether the replica's top is open on its synced volumes below (or has none)."""
    image = live.image
    below = image.chain[:-1]
    top = _node_there(image, target.storage, image.chain[-1])
    wanted = [_node_there(image, target.storage, ref).node for ref in reversed(below)]
    return live.daemon.backing_chain(top.node)[1:] == wanted


def _follow(run: StageRun, daemon: StorageDaemon, job: str, replica_top: str) -> None:
    """Wait for ``ready``, record the request and ask for the switch; return once QEMU says
    the job completed with the export on the replica's top."""
    cancel = run.cancel or threading.Event()
    asked = False
    while True:
        found = daemon.find_job(job)
        if found is None:
            raise live_stages._said(daemon, "query-jobs", f"the mirror {job} vanished")
        if found.total_progress and run.progress is not None:
            run.progress(100.0 * found.current_progress / found.total_progress)
        if found.status == "concluded":
            daemon.dismiss_job(found.id)
            if found.error is not None:
                raise ReplicationSwitchFailed(found.error, image_id=run.image_id)
            if daemon.export_node(export_name(run.image_id)) != replica_top:
                raise ReplicationSwitchFailed(
                    "the mirror ended without switching (cancelled)", image_id=run.image_id
                )
            return
        if found.status == "ready" and not asked:
            if run.phase != SWITCH_REQUESTED and run.live is not None:
                run.live.reach(SWITCH_REQUESTED)
            # Asked again by an attempt after "switch requested": the one before may have
            # died between the record and the request, and a ready job waits for it.
            run.crashpoints(points.MIGRATION_BEFORE_COMPLETE)
            daemon.complete_job(found.id)
            run.crashpoints(points.MIGRATION_AFTER_COMPLETE)
            asked = True
        if cancel.wait(POLL):
            # The job is left as it is: an abort stops it gently (engine/service/
            # migration_handlers.py), a stop or a stopping engine leaves it for the next
            # attempt, which finds it by name.
            raise run.cancelled("stopped while its mirror ran")


# --- helpers --------------------------------------------------------------------------------


def _target(run: StageRun, stage: Stage) -> Elsewhere:
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


def _there(storage: RepositoryStorage, ref: str) -> Volume:
    volume_id, fmt = ops.split_ref(ref)
    return Volume(ref, volume_id, fmt, storage.volume_path(volume_id, fmt))


def _node_there(image: Image, storage: RepositoryStorage, ref: str) -> ChainVolume:
    return volume_of(image, ref, _there(storage, ref).path)


def _make_empty(
    run: StageRun, storage: RepositoryStorage, volume: Volume, size: int, backing: str | None
) -> None:
    temp = storage.temp_path(volume.volume_id, volume.fmt, run.tag)
    storage.remove(temp)
    _create(run, storage, Volume(volume.ref, volume.volume_id, volume.fmt, temp), size, backing)
    run.confirm()
    storage.publish(temp, volume.path)


def _create(
    run: StageRun, storage: RepositoryStorage, temp: Volume, size: int, backing: str | None
) -> None:
    """An empty volume at ``temp.path`` reading ``backing`` (a volume of ``storage``)."""
    if backing is None:
        run.qemu.create(temp.path, temp.fmt, size, cancel=run.cancel)
        return
    below = _there(storage, backing)
    run.qemu.create(
        temp.path,
        temp.fmt,
        size,
        backing=storage.relative_backing(temp.path, below.path),
        backing_fmt=below.fmt,
        unsafe=True,
        cancel=run.cancel,
    )


def _merge_plan(op_id: str, merge: list[str], chain: list[str]) -> ops.OperationPlan:
    """The commit that merges the migration's automatic snapshot away once switched: its top
    written down into the volume below, the chain as before the migration."""
    base, top = merge
    return ops.plan(
        f"{op_id}-merge",  # the same on every attempt
        ops.Purpose.COMMIT,
        {
            "do": "commit",
            "volume": base,
            "top": top,
            "set_chain": [ref for ref in chain if ref != top],
        },
    )


def _size(volume: Volume) -> int:
    return max(1, os.path.getsize(volume.path))


def _progress_from(run: StageRun, before: int, total: int) -> Callable[[int], None]:
    def report(done: int) -> None:
        if done > 0:
            run.crashpoints(points.MIGRATION_MID_SYNC)
        _report(run, before + done, total)

    return report


def _report(run: StageRun, done: int, total: int) -> None:
    if run.progress is not None:
        run.progress(min(100.0, 100.0 * done / max(1, total)))
