"""A live storage migration's stages: the image's chain copied into another repository, where
a replica of the same id waits, and the switch to it (docs/adr/0029-live-storage-migration.md).

* ``clone`` and ``sync`` make the replica's files: engine/executors/replica_files.py.
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
from contextlib import suppress
from datetime import datetime

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import MirrorStage, SwitchStage
from engine.aggregates.work_rules import synced_volumes
from engine.errors import (
    DaemonError,
    ReplicationSwitchFailed,
)
from engine.executors import crashpoints as points
from engine.executors import live_stages
from engine.executors.replica_files import (
    clone,
    copy_volume,
    create_volume,
    file_size,
    report_progress,
    settle,
    sync,
    target_of,
    volume_there,
)
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


# --- mirror and switch ----------------------------------------------------------------------


def mirror(run: StageRun, stage: MirrorStage) -> None:
    """Start mirroring the image's top into the replica's, unless the job runs already.
    Offline there is nothing to mirror from: the switch copies the top."""
    live = run.live
    if live is not None and live.daemon.find_job(mirror_job_name(live.image.id)) is None:
        _start_mirror(run, live, target_of(run, stage), local(run, field(stage, "volume")))


def switch(run: StageRun, stage: SwitchStage) -> None:
    target = target_of(run, stage)
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
        copy_volume(
            run, target.storage, top, lambda done: report_progress(run, done, file_size(top))
        )
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
    replica = volume_there(target.storage, top.ref)
    temp = target.storage.temp_path(top.volume_id, top.fmt, run.tag)
    target.storage.remove(temp)
    backing = below[-1] if below else None
    create_volume(
        run, target.storage, Volume(top.ref, top.volume_id, top.fmt, temp), image.size, backing
    )
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


def _node_there(image: Image, storage: RepositoryStorage, ref: str) -> ChainVolume:
    return volume_of(image, ref, volume_there(storage, ref).path)


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
