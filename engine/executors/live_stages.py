"""Stages run live: through this host's storage daemon, on an image a virtual machine is using.

A stage whose volume belongs to an image attached on this host runs here as a QEMU job instead of
a qemu-img command (docs/adr/0028-live-operations-as-stages.md); the kind, and what its completion
records, stay the same:

* ``create`` of an attached disk's new top is a live snapshot: the overlay is made with
  ``qemu-img create -u`` (the daemon holds the old top's lock) and a relative backing name, added
  with ``"backing": null`` and switched to with ``blockdev-snapshot``; the export follows. The
  old top is then reopened read-only, which flushes it: the snapshot's data is on disk.
* ``rebase`` is ``block-stream`` of the volume's node down to the new backing's node (or all of
  it), which writes the relative name into the header when it completes.
* ``commit`` is ``block-commit`` into the base, reopened read-write first; an intermediate one
  writes the child's new backing name when it completes, an active one pivots once ``ready``.

Every attempt first looks for its job (named after its operation and stage: a restarted engine
finds the one its predecessor started) and for the job's effect on the daemon's graph (done
already: nothing to start). A job ends as QEMU says: a ``concluded`` job's ``error`` fails the
stage. The step whose outcome only the daemon knows, the active commit's pivot, is recorded
(``StageReached("pivoting")``) before it is asked for.

When the attempt is cancelled because the log moved on (the operation was stopped or aborted)
the job is cancelled too; when only this process is stopping, the job keeps running in the
daemon and the next engine on this host picks it up (docs/adr/0027).

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``, the
attachment names of ``engine.service``; the standard library.
"""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import suppress

from engine.aggregates.stage_kinds import CommitStage, CreateStage, RebaseStage, bandwidth_of
from engine.errors import DaemonError, VolumeMismatch
from engine.executors import stages
from engine.executors.stage_run import Live, StageRun, Volume, expect_backing, field, local
from engine.formats.qemu.storage_daemon import ChainVolume, Job, StorageDaemon
from engine.service.attachments import export_name, job_name, node_name, volume_of

logger = logging.getLogger("engine.executors")
POLL = 0.05  # seconds between looks at a running job


def execute(run: StageRun) -> None:
    """Run the stage live if it has a live form and the run was given the daemon, else offline."""
    live = run.live
    stage = run.stage
    if live is None:
        stages.execute(run)
    elif stage["do"] == "create" and stage.get("backing"):
        snapshot(run, stage, live)
    elif stage["do"] == "rebase":
        stream(run, stage, live)
    elif stage["do"] == "commit":
        commit(run, stage, live)
    else:
        stages.execute(run)


def snapshot(run: StageRun, stage: CreateStage, live: Live) -> None:
    volume = local(run, field(stage, "volume"))
    backing = local(run, stage.get("backing"))
    image, daemon = live.image, live.daemon
    new, old = _node(live, volume), _node(live, backing)
    if daemon.export_node(export_name(image.id)) == new.node:
        return  # switched by an earlier attempt
    size = stage.get("size") or image.size
    relative = run.storage.relative_backing(volume.path, backing.path)

    def make(temp: str) -> None:
        run.qemu.create(
            temp,
            "qcow2",
            size,
            backing=run.storage.relative_backing(temp, backing.path),
            backing_fmt=backing.fmt,
            unsafe=True,
            cancel=run.cancel,
        )

    def verify(final: str, info: dict[str, object]) -> None:
        if info["virtual-size"] != size:
            raise VolumeMismatch(f"virtual size {info['virtual-size']}, not {size}", path=final)
        expect_backing(run, final, dict(info), backing)

    stages.produce(run, volume, make, verify, reads=(backing,))
    if not _has_node(daemon, new.node):
        daemon.add_overlay(new)
    run.confirm()
    daemon.snapshot([(old.node, new.node)])
    # Read-only from now on: the snapshot's volume.
    daemon.reopen(old, below=_below(daemon, old.node), read_only=True)
    logger.info(
        "live snapshot of image %s: %s now writes to %s (backing %s)",
        image.id, export_name(image.id), volume.path, relative,
        extra={"image": str(image.id), "operation": run.op_id, "stage": run.index + 1},
    )  # fmt: skip


def stream(run: StageRun, stage: RebaseStage, live: Live) -> None:
    """``block-stream``: the volume reads everything between it and ``backing`` into itself."""
    volume = local(run, field(stage, "volume"))
    if volume.fmt != "qcow2":
        return
    backing = local(run, stage["backing"]) if stage.get("backing") else None
    image, daemon = live.image, live.daemon
    chain_volume = _node(live, volume)
    node = chain_volume.node
    base_node = None if backing is None else _node(live, backing).node
    job = job_name(run.op_id, run.index)
    folded = _between(daemon, node, base_node)
    # A volume below the top (a merge's child) is read-only in the daemon: QEMU streams into
    # it once it is reopened read-write, and it goes back to read-only after.
    inner = daemon.export_node(export_name(image.id)) != node
    if daemon.find_job(job) is None:
        if _below(daemon, node) == base_node:
            _drop_nodes(daemon, folded)
            return
        run.confirm()
        if inner:
            daemon.reopen(chain_volume, below=_below(daemon, node), read_only=False)
        daemon.stream(
            job,
            node,
            base_node=base_node,
            backing_file=None
            if backing is None
            else run.storage.relative_backing(volume.path, backing.path),
            speed=bandwidth_of(stage),
        )
    _follow(run, daemon, job)
    _drop_nodes(daemon, folded)
    if inner:
        daemon.reopen(chain_volume, below=base_node, read_only=True)


def commit(run: StageRun, stage: CommitStage, live: Live) -> None:
    """``block-commit`` of ``top`` into ``volume``; an active one pivots once ``ready``."""
    base = local(run, field(stage, "volume"))
    top = local(run, field(stage, "top"))
    child = local(run, stage["child"]) if stage.get("child") else None
    image, daemon = live.image, live.daemon
    base_volume = _node(live, base)
    base_node = base_volume.node
    committed = _committed(run, image.chain, base.ref, top.ref, image.id)
    job = job_name(run.op_id, run.index)
    if daemon.find_job(job) is None:
        active_node = daemon.export_node(export_name(image.id))
        if child is None and active_node == base_node:
            _drop_nodes(daemon, committed)
            return  # pivoted by an earlier attempt
        if child is not None and _below(daemon, _node(live, child).node) == base_node:
            _drop_nodes(daemon, committed)
            return  # completed by an earlier attempt
        if active_node is None:
            raise _said(daemon, "query-block-exports", f"image {image.id} is not exported here")
        run.confirm()
        daemon.reopen(base_volume, below=_below(daemon, base_node), read_only=False)
        daemon.commit(
            job,
            active_node,
            top_node=_node(live, top).node,
            base_node=base_node,
            backing_file=None
            if child is None
            else run.storage.relative_backing(child.path, base.path),
            speed=bandwidth_of(stage),
        )
    _follow(run, daemon, job, pivot=child is None)
    _drop_nodes(daemon, committed)


# --- following a job ------------------------------------------------------------------------


def _follow(run: StageRun, daemon: StorageDaemon, job: str, *, pivot: bool = False) -> None:
    """Report the job's progress until it concludes; pivot a ``ready`` one if asked, recording
    the request first. Raises the job's error, or StageCancelled."""
    cancel = run.cancel or threading.Event()
    asked = False
    while True:
        found = daemon.find_job(job)
        if found is None:
            raise _said(daemon, "query-jobs", f"job {job} vanished before this host read its end")
        if found.total_progress and run.progress is not None:
            run.progress(100.0 * found.current_progress / found.total_progress)
        if found.status == "concluded":
            _conclude(run, daemon, found)
            return
        if found.status == "ready" and pivot and not asked:
            if run.phase != stages.PIVOTING and run.live is not None:
                run.live.reach(stages.PIVOTING)
            daemon.complete_job(job)
            asked = True
        if cancel.wait(POLL):
            _cancelled(run, daemon, found)


def _conclude(run: StageRun, daemon: StorageDaemon, job: Job) -> None:
    daemon.dismiss_job(job.id)
    if job.error is not None:
        if run.moved_on():
            raise run.cancelled(f"job {job.id} was cancelled: {job.error}")
        raise _said(daemon, job.type, job.error)


def _cancelled(run: StageRun, daemon: StorageDaemon, job: Job) -> None:
    """The attempt was cancelled: if the log moved on (stopped, aborted, taken over) the job is
    cancelled as well, and ends without changing the chain; if only this engine is stopping,
    the job goes on in the daemon for the next engine on this host to follow."""
    if run.moved_on():
        with suppress(DaemonError):
            # Forced: a ready active commit cancelled without force ends with no error and
            # no pivot, which a later attempt would take for a commit that completed.
            daemon.cancel_job(job.id, force=True)
        with suppress(DaemonError):
            ended = daemon.wait_job(job.id, ("concluded",), timeout=30.0)
            daemon.dismiss_job(ended.id)
    raise run.cancelled("cancelled while its block job ran")


def _said(daemon: StorageDaemon, command: str, desc: str) -> DaemonError:
    """What the daemon's state says went wrong with ``command``, as its typed error."""
    return DaemonError(command=command, error_class=None, desc=desc, socket=daemon.paths.qmp_socket)


# --- the graph ------------------------------------------------------------------------------


def _node(live: Live, volume: Volume) -> ChainVolume:
    """``volume`` as the node of the attached image's chain in the daemon."""
    return volume_of(live.image, volume.ref, volume.path)


def _has_node(daemon: StorageDaemon, node: str) -> bool:
    try:
        daemon.backing_chain(node)
    except DaemonError:
        return False
    return True


def _below(daemon: StorageDaemon, node: str) -> str | None:
    chain = daemon.backing_chain(node)
    return chain[1] if len(chain) > 1 else None


def _between(daemon: StorageDaemon, node: str, base_node: str | None) -> list[str]:
    """The nodes strictly between ``node`` and ``base_node`` (to the bottom when None)."""
    chain = daemon.backing_chain(node)[1:]
    if base_node is not None and base_node in chain:
        chain = chain[: chain.index(base_node)]
    return chain


def _committed(
    run: StageRun, chain: list[str], base: str, top: str, image_id: uuid.UUID
) -> list[str]:
    """The nodes a commit of ``top`` into ``base`` leaves without a parent, top first."""
    if base not in chain or top not in chain:
        return []
    refs = chain[chain.index(base) + 1 : chain.index(top) + 1]
    return [node_name(image_id, ref, local(run, ref).path) for ref in reversed(refs)]


def _drop_nodes(daemon: StorageDaemon, nodes: list[str]) -> None:
    """``blockdev-del`` the nodes a job took out of the chain (still named, now unused)."""
    for node in nodes:
        with suppress(DaemonError):
            daemon.remove_nodes([node])
