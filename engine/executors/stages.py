"""The data work of each stage kind (engine/aggregates/stage_kinds.py), idempotent.

:func:`execute` runs a stage by its kind: one branch per kind, each narrowing the stage to its
typed form and handing it to that kind's executor below (``digest``'s, which only reads, in
engine/executors/digest_stage.py). A kind declared in stage_kinds without
a branch here is a mypy error (at ``_no_executor``), so a new kind cannot be planned without
being runnable (docs/adr/0021-typed-stages-and-enums.md).

Every stage that produces a volume does its work on a temporary file named after the volume and
the attempt (``<op_id>-<stage>-e<epoch>``: the claim epoch, so that a fenced host that comes back
writes into a file nobody publishes, ADR 0003), then publishes it atomically. A re-run after a
crash at any instruction therefore finds one of three things: the volume published (verify it,
drop leftovers: done), a temporary file of an earlier attempt (remove it, start again; a copy
takes over the file of the attempt that recorded its last checkpoint and resumes there,
engine/executors/copy_resume.py, docs/adr/0032), or nothing. A temporary file of a
*later* attempt (a higher epoch: the host that took the stage over while this one was paused)
is never touched. ``rebase`` and ``resize`` work in place: a
safe rebase rewrites only clusters whose content stays the same through the chain, and growing
to a size the volume already has is a no-op, so both can simply run again. A rebase run again
reads the old chain through the ``old_backing`` its stage names, not through the volume's
header: qemu-img rewrites the header before it writes the tables of what it copied
(docs/adr/0007-a-rebase-names-the-backing-it-folds.md).

Fencing (docs/adr/0005): right before anything other hosts read is written (a publish, an
in-place rewrite, a delete), ``confirm`` re-reads the claim from the log and checks this host's
lease. Two attempts that both get past it (one paused right after it, longer than the lease)
still cannot corrupt a volume: a publish is a ``link()`` that never replaces a file, and both
attempts made the same content from the same immutable inputs; in-place work is serialized by
QEMU's own image locks, and a volume locked by another process is waited for, not failed.

Raw volumes are preallocated with ``falloc``: it reserves the blocks (no ENOSPC in the guest
later, no allocation on first write) without writing zeroes, so a 100 GiB disk is ready in a
moment on local filesystems and NFS 4.2; ``full`` would write every byte for no more guarantee
on those filesystems.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``; the
standard library.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Never, NoReturn

from engine.aggregates import stage_kinds
from engine.aggregates.operations import SNAPSHOT, split_ref
from engine.aggregates.stage_kinds import (
    CommitStage,
    CopyStage,
    CreateStage,
    DeleteStage,
    DiffStage,
    RebaseStage,
    ResizeStage,
    Stage,
)
from engine.errors import (
    InvalidParameter,
    PivotUnknown,
    QemuCancelled,
    QemuError,
    StageCancelled,
    StorageFull,
    VolumeAlreadyExists,
    VolumeLocked,
    VolumeMismatch,
    storage_error,
)
from engine.executors import copy_resume
from engine.executors.crashpoints import (
    AFTER_PUBLISH,
    BEFORE_PUBLISH,
    MID_COPY,
    MID_DELETE,
    MID_REBASE,
)
from engine.executors.digest_stage import digest
from engine.executors.stage_run import (
    FindImage,
    ForeignReady,
    RepositoryAt,
    StageRun,
    Volume,
    expect_backing,
    field,
    find_source,
    local,
    nowhere,
    refuse_foreign,
    source_id,
    source_root,
    source_top,
)
from engine.executors.verify_stage import verify
from engine.formats.qemu.digests import VolumeDigest
from engine.formats.qemu.process import Progress
from engine.formats.repository.driver import RepositoryStorage, VolumeFile

PIVOTING = "pivoting"  # an active commit's phase: the switch onto the base was asked for
_NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as QEMU's tools print it
logger = logging.getLogger("engine.executors")


def run_stage(run: StageRun, executor: Callable[[StageRun], None] | None = None) -> None:
    """Run the stage (with ``executor``, :func:`execute` by default: the live stages hand
    their own); what the storage refused is said by its typed error (StorageFull,
    StorageReadOnly, PermissionDenied...), whoever hit it: Python, or QEMU's tool, which says
    only "No space left on device" on its standard error."""
    doing = f"stage {run.index + 1} ({run.stage['do']}) of operation {run.op_id}, in"
    try:
        (executor or execute)(run)
    except OSError as e:
        raise storage_error(e, doing, e.filename or run.storage.root) from e
    except QemuError as e:
        if _NO_SPACE in e.stderr:
            detail = f"{e.command}: {e.stderr}"
            raise StorageFull(detail, doing=doing, path=run.storage.root, errno=errno.ENOSPC) from e
        raise


# --- what a stage reads ---------------------------------------------------------------------


def source_image(stage: Stage) -> uuid.UUID | None:
    """The image whose whole chain the stage reads (it may live in another repository)."""
    return source_id(stage) if stage_kinds.reads_source(stage) else None


def inputs_ready(
    stage: Stage,
    is_ready: Callable[[str], bool],
    storage: RepositoryStorage,
    find_image: FindImage,
    foreign_ready: ForeignReady | None = None,
    repository_at: RepositoryAt = nowhere,
) -> bool:
    """Whether everything the stage reads is in place. ``is_ready`` answers for volumes of
    ``storage``'s repository (no pending stage still produces them), ``foreign_ready`` for
    volumes of another (without it, a volume there is in place once its file exists).
    ``repository_at``: the other repositories, for a stage that names the one to read its
    source from (``source_root``: a mend from a replica, docs/adr/0034).

    A volume that nothing will produce is ready even if its file is missing: the stage then
    runs and fails, saying which file it could not read, rather than wait for ever."""
    try:
        if not all(is_ready(ref) for ref in stage_kinds.local_inputs(stage)):
            return False
        source_id = source_image(stage)
        root = source_root(stage)
    except InvalidParameter:
        return True  # a malformed stage runs, and fails with this very message in the log
    if source_id is None:
        return True
    if root is not None and repository_at(root) is None:
        return True  # not connected here: the stage runs and fails, saying so
    found = find_source(stage, find_image, repository_at)
    if found is None or not found[0].chain:
        return False  # not on this host, or not made yet: another host, or later
    source, source_storage = found
    if os.path.realpath(source_storage.root) == os.path.realpath(storage.root):
        return all(is_ready(ref) for ref in source.chain)
    # Another repository's pending work is not in our view. A volume there is in place once
    # it is published, which its producer does only when its data is complete.
    pending = source.pending_volumes()
    if foreign_ready is not None:
        return all(
            ref not in pending and foreign_ready(source_storage, ref) for ref in source.chain
        )
    return all(
        ref not in pending and os.path.exists(source_storage.volume_path(*split_ref(ref)))
        for ref in source.chain
    )


def chain_changes(stage: Stage) -> dict[uuid.UUID, list[str]]:
    """Other images' new chains, recorded with the stage's completion (a merge's rebases)."""
    changes = stage.get("chain_changes") or {}
    try:
        return {uuid.UUID(str(k)): list(v) for k, v in changes.items()}
    except (AttributeError, TypeError, ValueError):
        raise InvalidParameter(
            f"chain_changes is not {{image id: chain}}: {changes!r}", name="stage"
        ) from None


# --- executors ------------------------------------------------------------------------------


def execute(run: StageRun) -> None:
    """Run the stage with its kind's executor."""
    stage = run.stage
    if stage["do"] == "create":
        create(run, stage)
    elif stage["do"] == "copy":
        copy(run, stage)
    elif stage["do"] == "diff":
        diff(run, stage)
    elif stage["do"] == "rebase":
        rebase(run, stage)
    elif stage["do"] == "resize":
        resize(run, stage)
    elif stage["do"] == "delete":
        delete(run, stage)
    elif stage["do"] == "commit":
        commit(run, stage)
    elif (
        stage["do"] == "clone"
        or stage["do"] == "sync"
        or stage["do"] == "mirror"
        or stage["do"] == "switch"
    ):
        _migration(stage)
    elif stage["do"] == "verify":
        verify(run, stage)
    elif stage["do"] == "digest":
        digest(run, stage)
    else:
        _no_executor(stage)


def _migration(stage: Stage) -> NoReturn:
    # A migration's stages reach another repository: engine/executors/migration_stages.py
    # (the replica's files: replica_files.py).
    raise InvalidParameter(
        f"a {stage['do']!r} stage runs through migration_stages.execute", name="stage"
    )


def _no_executor(stage: Never) -> NoReturn:
    # The scheduler claims only the kinds this Strata knows (stage_kinds.is_known).
    raise InvalidParameter(f"no executor for a {stage['do']!r} stage", name="stage")


def create(run: StageRun, stage: CreateStage) -> None:
    volume = local(run, field(stage, "volume"))
    fmt = volume.fmt
    size = stage.get("size")
    backing = local(run, stage["backing"]) if stage.get("backing") else None
    preallocation = "falloc" if stage.get("preallocate") and fmt == "raw" else None

    def make(temp: str) -> None:
        if backing is None:
            run.qemu.create(temp, fmt, size, preallocation=preallocation, cancel=run.cancel)
        else:
            relative = run.storage.relative_backing(temp, backing.path)
            run.qemu.create(
                temp, fmt, size, backing=relative, backing_fmt=backing.fmt, cancel=run.cancel
            )

    def verify(final: str, info: dict[str, Any]) -> None:
        expected = size
        if expected is None and backing is not None:
            expected = run.qemu.info(backing.path, fmt=backing.fmt)["virtual-size"]
        if info["virtual-size"] != expected:
            raise VolumeMismatch(f"virtual size {info['virtual-size']}, not {expected}", path=final)
        expect_backing(run, final, info, backing)

    produce(run, volume, make, verify, reads=(backing,))


def copy(run: StageRun, stage: CopyStage) -> None:
    """The source's guest-visible bytes into a new file, resumable from its checkpoints
    (engine/executors/checkpointed_copy.py, docs/adr/0032)."""
    volume = local(run, field(stage, "volume"))
    fmt = volume.fmt
    source = source_top(run)
    preallocation = "falloc" if stage.get("preallocate") and fmt == "raw" else None

    def new_file(temp: str, size: int) -> None:
        run.qemu.create(temp, fmt, size, preallocation=preallocation, cancel=run.cancel)

    def verify(final: str, info: dict[str, Any]) -> None:
        expect_backing(run, final, info, None)

    _checkpointed(run, volume, source, None, new_file, verify)


def diff(run: StageRun, stage: DiffStage) -> None:
    """An overlay of ``base`` holding only the clusters where the source reads otherwise
    (ADR 0004, incremental copies), written by the same resumable copy as ``copy``'s."""
    volume = local(run, field(stage, "volume"))
    if volume.fmt != "qcow2":
        raise InvalidParameter(f"a diff volume is qcow2, not {volume.fmt}", name="stage")
    source = source_top(run)
    base = local(run, field(stage, "base"))

    def new_file(temp: str, size: int) -> None:
        on_base = run.storage.relative_backing(temp, base.path)
        run.qemu.create(
            temp, "qcow2", size, backing=on_base, backing_fmt=base.fmt, cancel=run.cancel
        )

    def verify(final: str, info: dict[str, Any]) -> None:
        expect_backing(run, final, info, base)

    _checkpointed(run, volume, source, base, new_file, verify)


def rebase(run: StageRun, stage: RebaseStage) -> None:
    """Point ``volume`` at ``backing`` (None: no backing, its data folded in), in place.

    The data folded in is read through ``old_backing`` (the backing the volume had when the
    stage was planned), not through whatever the header names now: a qemu-img killed after it
    wrote the new header but before the tables of what it copied leaves the volume pointing at
    ``backing`` without that data, and a run that believed the header would find nothing left
    to do. A stage planned without ``old_backing`` (an older Strata) still reads the header.
    """
    volume = local(run, field(stage, "volume"))
    backing = local(run, stage["backing"]) if stage.get("backing") else None
    old = local(run, stage["old_backing"]) if stage.get("old_backing") else None
    if volume.fmt != "qcow2":
        if backing is not None:
            raise InvalidParameter(f"{volume.ref} is raw and cannot have a backing", name="stage")
        return  # a raw volume has no backing to fold in: nothing to do
    relative = None if backing is None else run.storage.relative_backing(volume.path, backing.path)
    progress = _rebase_progress(run)

    def work() -> None:
        run.qemu.rebase(
            volume.path,
            relative,
            backing_fmt=None if backing is None else backing.fmt,
            fmt="qcow2",
            safe=True,
            old_backing=None
            if old is None
            else run.storage.relative_backing(volume.path, old.path),
            old_backing_fmt=None if old is None else old.fmt,
            progress=progress,
            cancel=run.cancel,
        )

    _in_place(run, volume, work, reads=(backing, old))


def resize(run: StageRun, stage: ResizeStage) -> None:
    volume = local(run, field(stage, "volume"))
    size = field(stage, "size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise InvalidParameter(f"a 'resize' stage's size is bytes, not {size!r}", name="stage")
    _in_place(
        run, volume, lambda: run.qemu.resize(volume.path, size, fmt=volume.fmt, cancel=run.cancel)
    )


def commit(run: StageRun, stage: CommitStage) -> None:
    """Write ``top`` (and what lies between it and ``volume``) down into ``volume``, offline.

    ``qemu-img commit -d`` leaves ``top`` as it is, so a re-run reads the same data again. An
    intermediate commit then points ``child`` at the base (unsafe rebase: the data is there); a
    child that names the base already was switched by a live job that completed, and is done.

    An active commit whose pivot was requested (``run.phase``) by a host that died with its
    daemon may have switched the image onto the base, which the virtual machine then wrote to:
    committing ``top`` again would overwrite those writes. Where top and base read the same,
    either side is the image; where they differ, only the dead daemon knew, and the stage fails
    saying so, keeping both (docs/adr/0028).
    """
    base = local(run, field(stage, "volume"))
    top = local(run, field(stage, "top"))
    child = local(run, stage["child"]) if stage.get("child") else None
    if child is not None:
        wanted = run.storage.relative_backing(child.path, base.path)
        if run.qemu.info(child.path, fmt=child.fmt).get("backing-filename") == wanted:
            return
    elif run.phase == PIVOTING:
        if run.qemu.compare(top.path, base.path, a_fmt=top.fmt, b_fmt=base.fmt):
            return
        raise PivotUnknown(image_id=run.image_id, top=top.path, base=base.path)
    progress = run.progress

    def write_down() -> None:
        run.qemu.commit(
            top.path,
            base=base.path,
            fmt=top.fmt,
            keep=True,
            rate_limit=stage_kinds.bandwidth_of(stage),
            progress=progress,
            cancel=run.cancel,
        )

    _in_place(run, base, write_down, reads=(top, child))
    if child is not None:
        relative = run.storage.relative_backing(child.path, base.path)
        _in_place(
            run,
            child,
            lambda: run.qemu.rebase(
                child.path, relative, backing_fmt=base.fmt, fmt="qcow2", safe=False
            ),
            reads=(base,),
        )


def delete(run: StageRun, stage: DeleteStage) -> None:
    """Remove the volumes, and any temporary file that was becoming one of them; and the
    ``temporaries`` named (``[volume, tag]``: what a failed or stopped attempt left, while its
    volume is still to be made by a later one, whose files have other tags)."""
    refs = field(stage, "volumes")
    if not isinstance(refs, list | tuple):
        raise InvalidParameter(f"a 'delete' stage's volumes are a list, not {refs!r}", name="stage")
    volumes = [local(run, ref) for ref in refs]
    temporaries = [_temporary(run, named) for named in stage.get("temporaries") or ()]
    run.confirm()
    for path in temporaries:
        run.storage.remove(path)
    for n, volume in enumerate(volumes):
        for leftover in _temporaries(run.storage, volume.volume_id):
            run.storage.remove(leftover.path)
        run.storage.remove(volume.path)
        if n == 0:
            run.crashpoints(MID_DELETE)


# --- helpers --------------------------------------------------------------------------------


def _checkpointed(
    run: StageRun,
    volume: Volume,
    source: Volume,
    base: Volume | None,
    new_file: Callable[[str, int], None],
    verify: Callable[[str, dict[str, Any]], None],
) -> None:
    """Produce ``volume`` by a checkpointed copy of ``source`` (an overlay of ``base`` if
    given), resuming an earlier attempt's file from its checkpoint when both are there; and
    when the stage's image is immutable (a snapshot), hand the volume's digest to the
    completion."""
    last = run.last_checkpoint()
    resumable = None if last is None else _tag_at(run, last.epoch)
    wanted = run.keep_digest is not None and _immutable(run, volume)
    made: list[VolumeDigest | None] = []

    def make(temp: str) -> None:
        point = MID_REBASE if base else MID_COPY
        made.append(
            copy_resume.run_copy(
                run, volume, temp, source, base, new_file, last, point, digest=wanted
            )
        )

    produce(run, volume, make, verify, reads=(base,), resumable=resumable)
    if wanted and run.keep_digest is not None:
        digest = made[0] if made and made[0] is not None else None
        if digest is None:
            digest = copy_resume.digest_of(run, volume, last)
        run.keep_digest(volume.ref, digest)


def _tag_at(run: StageRun, epoch: int) -> str:
    return f"{run.op_id}-{run.index}-e{epoch}"


def _immutable(run: StageRun, volume: Volume) -> bool:
    """Whether ``volume`` is (or becomes, with the stage's completion) a volume of a snapshot's
    chain: what a digest is recorded for (docs/adr/0031)."""
    # This repository's image: a snapshot's copy elsewhere keeps its id (architecture §1), and
    # find_image may answer with the source, whose chain holds none of the copy's volumes.
    image = run.local_image(run.image_id)
    if image is None or image.kind != SNAPSHOT:
        return False
    return volume.ref in image.chain or volume.ref in (run.stage.get("set_chain") or ())


def produce(
    run: StageRun,
    volume: Volume,
    make: Callable[[str], None],
    verify: Callable[[str, dict[str, Any]], None],
    reads: tuple[Volume | None, ...] = (),
    resumable: str | None = None,
) -> None:
    """Make ``volume`` through a temporary file, unless an earlier attempt published it.
    ``reads``: the volumes of this repository that ``make`` reads; ``resumable``: the tag of
    an earlier attempt whose file ``make`` may take over (a checkpointed copy's), left to it
    rather than removed first."""
    temp = run.storage.temp_path(volume.volume_id, volume.fmt, run.tag)
    in_temp = Volume(volume.ref, volume.volume_id, volume.fmt, temp)
    refuse_foreign(run, volume, in_temp, *(v for v in reads if v is not None))
    leftovers = [
        f.path
        for f in _temporaries(run.storage, volume.volume_id)
        if not run.is_later_attempt(f.tag)  # the file of whoever took this stage over
    ]
    if os.path.exists(volume.path):
        # Published only after its data was complete and durable; a crash may have left its
        # temporary name too (a second link to the same file), or an older attempt's file.
        verify(volume.path, run.qemu.info(volume.path, fmt=volume.fmt))
        for leftover in leftovers:
            run.storage.remove(leftover)
        return
    for leftover in leftovers:
        if resumable is None or leftover != run.storage.temp_path(
            volume.volume_id, volume.fmt, resumable
        ):
            run.storage.remove(leftover)
    try:
        make(temp)
        run.crashpoints(BEFORE_PUBLISH)
        run.confirm()
        run.storage.publish(temp, volume.path)
    except (StageCancelled, QemuCancelled):
        # Taken over: nobody will ever publish this attempt's file, and a check would not
        # offer it to clean (its volume is in use), so it goes now. A stop or a host that
        # shuts down keeps it, as a crash would.
        if run.superseded():
            run.storage.remove(temp)
        raise
    except VolumeAlreadyExists:
        # Another attempt at this very stage published first (we were counted dead and came
        # back, or the other way round). It made the same content from the same inputs:
        # check what it published, as a re-run would, and drop ours.
        try:
            verify(volume.path, run.qemu.info(volume.path, fmt=volume.fmt))
        finally:
            run.storage.remove(temp)
        return
    run.crashpoints(AFTER_PUBLISH)


def _in_place(
    run: StageRun,
    volume: Volume,
    work: Callable[[], None],
    reads: tuple[Volume | None, ...] = (),
) -> None:
    """Run in-place ``work`` on ``volume`` once the claim is confirmed; while QEMU says another
    process holds the volume's lock (a fenced host's qemu-img, still running), wait and try
    again rather than fail: that process either finishes the same idempotent work or dies."""
    started = time.monotonic()
    delay = 0.1
    told = False
    while True:
        run.confirm()
        refuse_foreign(run, volume, *(v for v in reads if v is not None))
        try:
            work()
            return
        except QemuCancelled:
            raise
        except QemuError as e:
            if not e.locked:
                raise
            waited = time.monotonic() - started
            if not told:  # the first refusal: say why the stage waits, once
                told = True
                logger.info(
                    "volume %s is locked by another process (a fenced host's qemu-img?): "
                    "waiting up to %.0f s for it",
                    volume.path, run.lock_wait, extra={
                        "image": str(run.image_id),
                        "operation": run.op_id,
                        "stage": run.index + 1,
                        "path": volume.path,
                    },
                )  # fmt: skip
            if waited >= run.lock_wait:
                raise VolumeLocked(
                    path=volume.path,
                    waited=round(waited, 1),
                    command=e.command,
                    returncode=e.returncode,
                    stderr=e.stderr,
                ) from e
        cancel = run.cancel or threading.Event()
        if cancel.wait(delay):
            raise run.cancelled("cancelled while the volume was locked by another process")
        delay = min(delay * 2, 1.0)


def _rebase_progress(run: StageRun) -> Progress:
    """The stage's progress callback, with the mid-rebase crash point on the first report
    strictly between 0 and 100 (qemu-img reports 0 before it starts and 100 when done)."""
    reached = False

    def progress(percent: float) -> None:
        nonlocal reached
        if not reached and 0 < percent < 100:
            reached = True
            run.crashpoints(MID_REBASE)
        if run.progress is not None:
            run.progress(percent)

    return progress


def _temporary(run: StageRun, named: object) -> str:
    if not isinstance(named, list | tuple) or len(named) != 2:
        raise InvalidParameter(f"a temporary is [volume, tag], not {named!r}", name="stage")
    volume = local(run, named[0])
    return run.storage.temp_path(volume.volume_id, volume.fmt, named[1])


def _temporaries(storage: RepositoryStorage, volume_id: str) -> list[VolumeFile]:
    return storage.temporaries_of(volume_id)
