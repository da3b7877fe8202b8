"""The image aggregate: a virtual disk or a snapshot, its volume chain and its queue of work.

Pure: decides and records events; every value (ids, time, host) is passed in. Commands refuse
what cannot be accepted with the engine's typed errors; nothing here touches a file.
See docs/adr/0004-images-volumes-operations-and-stages.md.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypedDict

from engine.aggregates import operations as ops
from engine.aggregates.base import Aggregate, Appliers
from engine.aggregates.operations import Operation, OperationPlan
from engine.aggregates.topics import StableTopic
from engine.errors import (
    ClaimLost,
    ImageInUse,
    ImageNotFound,
    ImageNotReady,
    InvalidParameter,
    ReplicationError,
    StaleFix,
    WrongImageKind,
)

_DONE = ops.DONE


class DigestRecord(TypedDict):
    """A volume's digest as the log recorded it (engine/formats/qemu/digests.py says what it is
    over): ``chunks`` is the 32-byte sha256 of each chunk of ``chunk_size`` bytes, in order."""

    size: int
    chunk_size: int
    chunks: bytes
    digest: str


class DamageRecord(TypedDict):
    """What the last deep check that found a volume damaged said (``Image.DamageFound``)."""

    ranges: list[list[int]]  # [start, end) of each chunk whose content differs
    detail: str
    found_on: datetime
    found_by: str  # the host that ran the deep check


class Image(Aggregate["Image.Event"], StableTopic):
    TOPIC = "strata.image.Image"

    @dataclass(frozen=True, kw_only=True)
    class Event(StableTopic):
        TOPIC = "strata.image.Event"

        originator_id: uuid.UUID
        originator_version: int
        timestamp: datetime
        host_id: str

    @dataclass(frozen=True, kw_only=True)
    class ImageRequested(Event):
        TOPIC = "strata.image.ImageRequested"

        kind: str
        size: int
        chain: list[str]
        user_data: object  # an engine.opaque.Opaque, None, or a plain value from an older log
        strategy: str
        auto_fix: bool
        origin: dict[str, str]  # how it was made: blank, from a snapshot, a copy of...
        operations: list[OperationPlan]

    @dataclass(frozen=True, kw_only=True)
    class SnapshotTaken(Event):
        """The disk's top volume is frozen (for a snapshot, or as the base of an incremental
        copy when ``snapshot_id`` is None); the disk writes to a new overlay from now on.

        Unfinished ``optimize`` operations are superseded: they would flatten a chain whose new
        top a later operation produces. ``operations`` re-plans what the disk needs now.
        """

        TOPIC = "strata.image.SnapshotTaken"

        snapshot_id: uuid.UUID | None
        chain: list[str]
        operations: list[OperationPlan]

    @dataclass(frozen=True, kw_only=True)
    class FixRequested(Event):
        TOPIC = "strata.image.FixRequested"

        fix_type: str
        operation: OperationPlan | None  # a new operation, or None to release/resume op_id
        op_id: str

    @dataclass(frozen=True, kw_only=True)
    class StageClaimed(Event):
        TOPIC = "strata.image.StageClaimed"

        op_id: str
        stage: int
        epoch: int

    @dataclass(frozen=True, kw_only=True)
    class StageProgressed(Event):
        TOPIC = "strata.image.StageProgressed"

        op_id: str
        stage: int
        epoch: int
        percent: int

    @dataclass(frozen=True, kw_only=True)
    class StageCheckpointed(Event):
        """A copy's data up to ``offset`` is durable in its attempt's temporary file: what a
        later attempt resumes from (docs/adr/0032). ``chunks``: the 32-byte digests of the
        chunks completed since the attempt's previous checkpoint (for its first, since the
        volume's start: a resumed attempt repeats those it took over); ``written``: bytes
        this attempt has written so far, as the kernel counted them."""

        TOPIC = "strata.image.StageCheckpointed"

        op_id: str
        stage: int
        epoch: int
        offset: int
        percent: int
        chunks: bytes
        written: int

    @dataclass(frozen=True, kw_only=True)
    class StageCompleted(Event):
        TOPIC = "strata.image.StageCompleted"

        op_id: str
        stage: int
        epoch: int

    @dataclass(frozen=True, kw_only=True)
    class StageFailed(Event):
        TOPIC = "strata.image.StageFailed"

        op_id: str
        stage: int
        epoch: int
        error: str

    @dataclass(frozen=True, kw_only=True)
    class FixStopped(Event):
        TOPIC = "strata.image.FixStopped"

        op_id: str
        reason: str

    @dataclass(frozen=True, kw_only=True)
    class DamageFound(Event):
        """A deep check found ``volume`` damaged: ``ranges``, the byte ranges ``[start, end)``
        of the chunks whose content differs from its recorded digest (empty when it is the
        volume's structure that ``qemu-img check`` found corrupt), ``detail`` what was found.
        Recorded on the image that owns the volume, removed or not (docs/adr/0033)."""

        TOPIC = "strata.image.DamageFound"

        volume: str
        ranges: list[list[int]]
        detail: str

    @dataclass(frozen=True, kw_only=True)
    class ChainChanged(Event):
        TOPIC = "strata.image.ChainChanged"

        chain: list[str]
        reason: str

    @dataclass(frozen=True, kw_only=True)
    class ImageRemoved(Event):
        """Version 2 adds ``reason``; a version 1 event is upcast with no reason given."""

        TOPIC = "strata.image.ImageRemoved"
        class_version = 2

        reason: str = ""

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["reason"] = ""

    @dataclass(frozen=True, kw_only=True)
    class UserDataSet(Event):
        TOPIC = "strata.image.UserDataSet"

        user_data: object

    @dataclass(frozen=True, kw_only=True)
    class ImagePrepared(Event):
        TOPIC = "strata.image.ImagePrepared"

    @dataclass(frozen=True, kw_only=True)
    class ImageTornDown(Event):
        TOPIC = "strata.image.ImageTornDown"

    @dataclass(frozen=True, kw_only=True)
    class ImageAttached(Event):
        """The appending host's storage daemon serves the image (docs/adr/0027)."""

        TOPIC = "strata.image.ImageAttached"

    @dataclass(frozen=True, kw_only=True)
    class AttachmentReleased(Event):
        """``of_host`` no longer uses the image: it died (its lease expired) with its daemon,
        which served the image; appended by the host that found it so."""

        TOPIC = "strata.image.AttachmentReleased"

        of_host: str
        reason: str

    @dataclass(frozen=True, kw_only=True)
    class OperationRequested(Event):
        """A block job (pull, commit) asked for by a caller, queued like any operation."""

        TOPIC = "strata.image.OperationRequested"

        operation: OperationPlan

    @dataclass(frozen=True, kw_only=True)
    class StageReached(Event):
        """A live stage is about to take a step whose outcome only the daemon would know
        (``phase``): recorded before the step, so that whoever finishes the stage after a
        crash knows it may have been taken (docs/adr/0028)."""

        TOPIC = "strata.image.StageReached"

        op_id: str
        stage: int
        epoch: int
        phase: str

    @dataclass(frozen=True, kw_only=True)
    class OperationAborted(Event):
        """abort_block_job: the operation ends with the chain as it was."""

        TOPIC = "strata.image.OperationAborted"

        op_id: str
        reason: str

    @dataclass(frozen=True, kw_only=True)
    class ReplicationStarted(Event):
        """The image is being copied into the repository at ``target`` (its root), where a
        replica of the same id waits (docs/adr/0029): no other change until it ends."""

        TOPIC = "strata.image.ReplicationStarted"

        target: str

    @dataclass(frozen=True, kw_only=True)
    class ReplicationEnded(Event):
        """``outcome``: ``switched`` (the image lives in ``target`` now, and is removed here in
        the same transaction) or ``aborted`` (it stays here)."""

        TOPIC = "strata.image.ReplicationEnded"

        target: str
        outcome: str

    @dataclass(frozen=True, kw_only=True)
    class ReplicaSwitched(Event):
        """In the destination: the replica is the image from now on (the source's copy is
        removed next); ``attached``: the appending host's daemon serves it, through the export
        it served the source with. ``operations``: what it needs now (the automatic snapshot
        merged away)."""

        TOPIC = "strata.image.ReplicaSwitched"

        source: str
        attached: bool
        operations: list[OperationPlan]

    @dataclass(frozen=True, kw_only=True)
    class ReplicaRenewed(Event):
        """In the destination: a new migration's replica, under the id of an image removed
        there (an aborted migration's replica, or the image, migrated away before): the image
        starts over with this chain."""

        TOPIC = "strata.image.ReplicaRenewed"

        size: int
        chain: list[str]
        user_data: object
        origin: dict[str, str]

    @dataclass(frozen=True, kw_only=True)
    class ImageResized(Event):
        TOPIC = "strata.image.ImageResized"

        size: int
        operation: OperationPlan

    @dataclass(frozen=True, kw_only=True)
    class VolumeDigested(Event):
        """The digest of an immutable volume of this image (docs/adr/0031): recorded by the
        stage that made it immutable, in the transaction of its completion."""

        TOPIC = "strata.image.VolumeDigested"

        volume: str
        size: int
        chunk_size: int
        chunks: bytes
        digest: str

    # --- state ----------------------------------------------------------------------------

    id: uuid.UUID
    version: int
    created_on: datetime
    modified_on: datetime
    created_by: str
    kind: str
    size: int
    chain: list[str]
    user_data: Any  # as the events carry it; engine.opaque.value_of gives the caller's value
    strategy: str
    auto_fix: bool
    origin: dict[str, str]
    operations: list[Operation]
    removed: bool
    prepared_on: set[str]
    attached_on: str | None  # the host whose storage daemon serves it, if any
    # Live storage migration (docs/adr/0029): in the destination, the source repository's
    # root while this is a replica being filled; in the source, the destination's root while
    # a replication runs.
    replica_of: str | None
    replicating_to: str | None
    last_host: str
    last_error: str | None
    # The recorded digest of each of its immutable volumes that has one (docs/adr/0031).
    digests: dict[str, DigestRecord]
    # What deep checks found rotten or corrupt in the volumes this image owns, by volume,
    # until a stage of this image makes the volume again (docs/adr/0033). Replaced, never
    # changed in place: the view's images are copy-on-write.
    damage: dict[str, DamageRecord]

    # --- commands -------------------------------------------------------------------------

    @classmethod
    def request(
        cls,
        *,
        image_id: uuid.UUID,
        kind: str,
        size: int,
        chain: list[str],
        user_data: object,
        strategy: str,
        auto_fix: bool,
        origin: dict[str, str],
        operations: list[OperationPlan],
        host_id: str,
        now: datetime,
    ) -> Image:
        image = cls()
        image._record(
            cls.ImageRequested(
                originator_id=image_id,
                originator_version=1,
                timestamp=now,
                host_id=host_id,
                kind=kind,
                size=size,
                chain=list(chain),
                user_data=user_data,
                strategy=strategy,
                auto_fix=auto_fix,
                origin=origin,
                operations=operations,
            )
        )
        return image

    def take_snapshot(
        self,
        *,
        snapshot_id: uuid.UUID | None,
        new_top: str,
        operations: list[OperationPlan],
        host_id: str,
        now: datetime,
    ) -> list[str]:
        """Freeze the current chain (for a snapshot when ``snapshot_id`` is given); return it."""
        self._require_live()
        self._require_kind(ops.VIRTUAL_DISK)
        self._require_not_opened("snapshots of a running disk are taken while it is attached")
        self._require_not_replicating()
        busy = self.current_operation()
        if busy is not None and busy.purpose in ops.BLOCK_JOBS:
            # Its completion sets the chain it planned, which would lose the new top.
            raise ImageNotReady(
                f"block job {busy.op_id} ({busy.purpose}) is {busy.state}; it sets the chain "
                "when it ends: wait for it, or abort it",
                image_id=self.id,
                status="busy",
            )
        frozen = list(self.chain)
        self._trigger(
            self.SnapshotTaken,
            host_id,
            now,
            snapshot_id=snapshot_id,
            chain=[*frozen, new_top],
            operations=operations,
        )
        return frozen

    def request_fix(
        self,
        *,
        fix_type: str,
        op_id: str,
        operation: OperationPlan | None,
        host_id: str,
        now: datetime,
    ) -> bool:
        """Queue a new operation, or release/resume ``op_id``; False if already done so.

        A removed image takes clean and merge work, and the release of its own blocked work
        (which the check offers only where that work makes what live work reads)."""
        self._require_live(allow_removed=fix_type in (ops.CLEAN, ops.MERGE) or operation is None)
        existing = self.operation(op_id)
        if operation is not None:
            if existing is not None:
                return False  # the same fix was already started (maybe by another host)
        elif existing is None:
            raise StaleFix(f"operation {op_id} is unknown to image {self.id}")
        elif existing.state not in (ops.HELD, ops.FAILED, ops.STOPPED):
            return False  # already running again, or done
        self._trigger(
            self.FixRequested, host_id, now, fix_type=fix_type, operation=operation, op_id=op_id
        )
        return True

    def claim(
        self,
        *,
        op_id: str,
        stage: int,
        host_id: str,
        now: datetime,
        take_over: str | None = None,
    ) -> int:
        """Claim a stage that is next to run; return the claim epoch.

        ``take_over`` names the host whose claim the caller decided to take over (it counted
        that host dead); the claim is refused if another host holds the stage by now.
        """
        op = self._runnable(op_id, stage)
        if take_over is not None and op.claim_host not in (None, take_over, host_id):
            raise ClaimLost(
                f"taken over by {op.claim_host} at epoch {op.claim_epoch} first",
                image_id=self.id,
                stage=stage,
            )
        epoch = op.claim_epoch + 1
        self._trigger(self.StageClaimed, host_id, now, op_id=op_id, stage=stage, epoch=epoch)
        return epoch

    def progress(
        self, *, op_id: str, stage: int, epoch: int, percent: int, host_id: str, now: datetime
    ) -> None:
        self._holding(op_id, stage, epoch, host_id)
        self._trigger(
            self.StageProgressed,
            host_id,
            now,
            op_id=op_id,
            stage=stage,
            epoch=epoch,
            percent=max(0, min(100, int(percent))),
        )

    def checkpoint(
        self,
        *,
        op_id: str,
        stage: int,
        epoch: int,
        offset: int,
        percent: int,
        chunks: bytes,
        written: int,
        host_id: str,
        now: datetime,
    ) -> None:
        """Record that the stage's copy is durable up to ``offset`` (docs/adr/0032)."""
        op = self._holding(op_id, stage, epoch, host_id)
        if len(chunks) % 32:
            raise InvalidParameter(
                f"chunk digests of 32 bytes each, not {len(chunks)} bytes", name="chunks"
            )
        if (op.checkpoint_stage, op.checkpoint_epoch) == (stage, epoch) and (
            offset < op.checkpoint_offset
        ):
            raise InvalidParameter(
                f"a checkpoint at {offset} behind the last one at {op.checkpoint_offset}",
                name="offset",
            )
        self._trigger(
            self.StageCheckpointed,
            host_id,
            now,
            op_id=op_id,
            stage=stage,
            epoch=epoch,
            offset=offset,
            percent=max(0, min(100, int(percent))),
            chunks=bytes(chunks),
            written=written,
        )

    def complete(self, *, op_id: str, stage: int, epoch: int, host_id: str, now: datetime) -> None:
        op = self._holding(op_id, stage, epoch, host_id)
        self._trigger(self.StageCompleted, host_id, now, op_id=op_id, stage=stage, epoch=epoch)
        if op.stages[stage].get("do") == "switch" and self.replicating_to is not None:
            # The replica is the image now (its log says so first): this copy goes.
            self.end_replication(outcome="switched", host_id=host_id, now=now)

    def fail(
        self, *, op_id: str, stage: int, epoch: int, error: str, host_id: str, now: datetime
    ) -> None:
        self._holding(op_id, stage, epoch, host_id)
        self._trigger(
            self.StageFailed, host_id, now, op_id=op_id, stage=stage, epoch=epoch, error=error
        )

    def stop(self, *, reason: str, host_id: str, now: datetime) -> str | None:
        """Stop the operation in progress; return its id, or None if nothing was running."""
        self._require_live(allow_removed=True)
        op = self.current_operation()
        if op is None or op.state not in (ops.PENDING, ops.HELD):
            return None
        self._trigger(self.FixStopped, host_id, now, op_id=op.op_id, reason=reason)
        return op.op_id

    def record_damage(
        self,
        *,
        volume: str,
        ranges: list[list[int]],
        detail: str,
        host_id: str,
        now: datetime,
    ) -> None:
        """DamageFound: what a deep check found wrong with ``volume``, which this image owns
        (removed or not: a removed snapshot's volume may still be read by live chains)."""
        self._trigger(
            self.DamageFound,
            host_id,
            now,
            volume=volume,
            ranges=[[int(start), int(end)] for start, end in ranges],
            detail=detail,
        )

    def change_chain(self, *, chain: list[str], reason: str, host_id: str, now: datetime) -> None:
        self._trigger(self.ChainChanged, host_id, now, chain=list(chain), reason=reason)

    def remove(self, *, host_id: str, now: datetime, reason: str = "") -> None:
        self._require_live()
        if self.replicating_to is not None:
            raise ImageInUse(
                f"being migrated to {self.replicating_to}; finish or abort that first",
                image_id=self.id,
            )
        if self.prepared_on:
            what = "attached" if self.attached_on else "prepared"
            raise ImageInUse(f"{what} on {sorted(self.prepared_on)}", image_id=self.id)
        self._trigger(self.ImageRemoved, host_id, now, reason=reason)

    def set_user_data(self, *, user_data: object, host_id: str, now: datetime) -> None:
        self._require_live()
        self._trigger(self.UserDataSet, host_id, now, user_data=user_data)

    def prepare(self, *, host_id: str, now: datetime) -> None:
        self._require_live()
        if host_id not in self.prepared_on:
            self._trigger(self.ImagePrepared, host_id, now)

    def attach(self, *, host_id: str, now: datetime) -> None:
        """For this host's daemon to serve: refused while another host has it (one writer;
        ImageInUse), a no-op when this host already serves it."""
        self._require_live()
        others = self.prepared_on - {host_id}
        if others:
            raise ImageInUse(f"prepared on {sorted(others)}", image_id=self.id)
        if self.attached_on != host_id:
            if host_id in self.prepared_on:
                raise ImageInUse(
                    f"prepared on {host_id} for a virtual machine that opens its file",
                    image_id=self.id,
                )
            self._trigger(self.ImageAttached, host_id, now)

    def release_attachment(self, *, of_host: str, reason: str, host_id: str, now: datetime) -> None:
        """``of_host`` is dead, and its daemon with it: the image is no longer in use there."""
        if of_host in self.prepared_on:
            self._trigger(self.AttachmentReleased, host_id, now, of_host=of_host, reason=reason)

    def tear_down(self, *, host_id: str, now: datetime) -> None:
        if host_id in self.prepared_on:
            self._trigger(self.ImageTornDown, host_id, now)

    def request_operation(self, *, operation: OperationPlan, host_id: str, now: datetime) -> None:
        """Queue a block job. The chain it plans from must be the one it will run on, so it is
        refused while other work is unfinished (ImageNotReady)."""
        self._require_live()
        self._require_kind(ops.VIRTUAL_DISK)
        self._require_not_replicating()
        self._require_idle("a block job plans from the chain that work leaves")
        self._trigger(self.OperationRequested, host_id, now, operation=operation)

    def reach(
        self, *, op_id: str, stage: int, epoch: int, phase: str, host_id: str, now: datetime
    ) -> None:
        self._holding(op_id, stage, epoch, host_id)
        self._trigger(
            self.StageReached, host_id, now, op_id=op_id, stage=stage, epoch=epoch, phase=phase
        )

    def abort_operation(self, *, op_id: str, reason: str, host_id: str, now: datetime) -> None:
        """End a block job where it is: its stages' work so far changed no content."""
        op = self.operation(op_id)
        if op is None or op.finished or op.purpose not in (*ops.BLOCK_JOBS, *ops.MIGRATION):
            raise StaleFix(f"no block job {op_id} runs on image {self.id}")
        self._trigger(self.OperationAborted, host_id, now, op_id=op_id, reason=reason)

    def start_replication(
        self, *, target: str, operation: OperationPlan | None, host_id: str, now: datetime
    ) -> None:
        """Begin copying the image into the repository at ``target`` (where its replica was
        requested), queueing ``operation`` if given. Refused while another replication runs
        (ReplicationError) or other work is unfinished (ImageNotReady)."""
        self._require_live()
        if self.replicating_to is not None:
            raise ReplicationError(
                f"a replication to {self.replicating_to} runs already", image_id=self.id
            )
        self._require_not_opened("a migration moves the files it has open")
        if operation is not None:
            self._require_idle("a migration copies the chain that work leaves")
        self._trigger(self.ReplicationStarted, host_id, now, target=target)
        if operation is not None:
            self._trigger(self.OperationRequested, host_id, now, operation=operation)

    def request_migration_step(
        self, *, operation: OperationPlan, host_id: str, now: datetime
    ) -> None:
        """Queue a step of a running replication (sync, switch): refused if none runs
        (ReplicationError)."""
        self._require_live()
        if self.replicating_to is None:
            raise ReplicationError("no replication runs", image_id=self.id)
        self._trigger(self.OperationRequested, host_id, now, operation=operation)

    def end_replication(
        self, *, outcome: str, host_id: str, now: datetime, reason: str = ""
    ) -> None:
        """The replication ended: ``switched`` removes the image here (it lives in the
        destination now, docs/adr/0029), ``aborted`` leaves it as it is."""
        target = self.replicating_to
        if target is None:
            raise ReplicationError("no replication runs", image_id=self.id)
        self._trigger(self.ReplicationEnded, host_id, now, target=target, outcome=outcome)
        if outcome == "switched":
            if self.attached_on == host_id:  # its daemon serves the replica now
                self._trigger(self.ImageTornDown, host_id, now)
            self._trigger(self.ImageRemoved, host_id, now, reason=reason or f"migrated to {target}")

    def switch_replica(
        self,
        *,
        attached: bool,
        operations: list[OperationPlan],
        host_id: str,
        now: datetime,
    ) -> bool:
        """Make this replica the image; False if it is one no longer (an earlier attempt)."""
        if self.replica_of is None or self.removed:
            return False
        self._trigger(
            self.ReplicaSwitched,
            host_id,
            now,
            source=self.replica_of,
            attached=attached,
            operations=operations,
        )
        return True

    def renew_replica(
        self,
        *,
        size: int,
        chain: list[str],
        user_data: object,
        origin: dict[str, str],
        host_id: str,
        now: datetime,
    ) -> None:
        """Start a replica over under the id of an image removed here (an aborted migration's
        replica, or the image itself, migrated away before) or of a replica nothing fills (an
        orphan: the caller checked); ReplicationError if it is a live image."""
        if not (self.removed or self.replica_of is not None):
            raise ReplicationError(
                "the destination holds an image of this id already", image_id=self.id
            )
        self._trigger(
            self.ReplicaRenewed,
            host_id,
            now,
            size=size,
            chain=list(chain),
            user_data=user_data,
            origin=dict(origin),
        )

    def discard_replica(self, *, reason: str, host_id: str, now: datetime) -> None:
        """The migration that made this replica was aborted: it goes, the source stays."""
        if self.replica_of is not None and not self.removed:
            self._trigger(self.ImageRemoved, host_id, now, reason=reason)

    def resize(self, *, size: int, op: OperationPlan, host_id: str, now: datetime) -> None:
        self._require_live()
        self._require_kind(ops.VIRTUAL_DISK)
        if size <= self.size:
            raise InvalidParameter(
                f"{size} is not larger than the current {self.size} bytes (disks only grow)",
                name="new_size",
            )
        self._trigger(self.ImageResized, host_id, now, size=size, operation=op)

    # --- queries --------------------------------------------------------------------------

    def record_digest(
        self,
        *,
        volume: str,
        size: int,
        chunk_size: int,
        chunks: bytes,
        digest: str,
        host_id: str,
        now: datetime,
    ) -> None:
        """Record an immutable volume's digest. Allowed on a removed image too: a removed
        snapshot's volume that other chains still read keeps its digest."""
        if volume not in self.chain:
            raise InvalidParameter(
                f"volume {volume} is not in the chain of image {self.id}", name="volume"
            )
        self._trigger(
            self.VolumeDigested,
            host_id,
            now,
            volume=volume,
            size=size,
            chunk_size=chunk_size,
            chunks=bytes(chunks),
            digest=digest,
        )

    def operation(self, op_id: str) -> Operation | None:
        for op in self.operations:
            if op.op_id == op_id:
                return op
        return None

    def current_operation(self) -> Operation | None:
        """The first operation not done: the one running, blocked, or next to run."""
        for op in self.operations:
            if op.state != _DONE:  # op.finished without a property call: asked very often
                return op
        return None

    def last_operation(self) -> Operation | None:
        return self.operations[-1] if self.operations else None

    def pending_volumes(self) -> set[str]:
        """Volumes this image's unfinished stages will still produce."""
        pending: set[str] = set()
        for op in self.operations:
            for stage in op.stages[op.done :]:
                volume = ops.produced_by(stage)
                if volume is not None:
                    pending.add(volume)
        return pending

    # --- guards ---------------------------------------------------------------------------

    def _require_live(self, *, allow_removed: bool = False) -> None:
        if self.removed and not allow_removed:
            raise ImageNotFound("(it was removed)", image_id=self.id)
        # A discarded replica is a removed image: clean frees its volumes (docs/adr/0029).
        if self.replica_of is not None and not self.removed:
            raise ImageNotReady(
                f"a replica being filled by a migration from {self.replica_of}; it is the "
                "image once the migration switches to it",
                image_id=self.id,
                status="broken",
            )

    def _require_not_replicating(self) -> None:
        if self.replicating_to is not None:
            raise ImageNotReady(
                f"being migrated to {self.replicating_to}: wait for the migration, or abort it",
                image_id=self.id,
                status="busy",
            )

    def _require_idle(self, why: str) -> None:
        busy = self.current_operation()
        if busy is not None:
            raise ImageNotReady(
                f"operation {busy.op_id} ({busy.purpose}) is {busy.state}; {why}: wait for it, "
                "or stop it",
                image_id=self.id,
                status="busy",
            )

    def _require_not_opened(self, why: str) -> None:
        """ImageInUse if a virtual machine has the image's files open itself (prepared, not
        attached): what it writes bypasses the host's daemon, so nothing may switch them."""
        opened = self.prepared_on - {self.attached_on}
        if opened:
            raise ImageInUse(
                f"prepared for a virtual machine on {sorted(opened)}; {why}", image_id=self.id
            )

    def _require_kind(self, kind: str) -> None:
        if self.kind != kind:
            raise WrongImageKind(image_id=self.id, kind=self.kind, expected=kind)

    def _runnable(self, op_id: str, stage: int) -> Operation:
        op = self.current_operation()
        if op is None or op.op_id != op_id or op.done != stage or op.state != ops.PENDING:
            raise ClaimLost(
                f"operation {op_id} stage {stage} is not the next to run",
                image_id=self.id,
                stage=stage,
            )
        return op

    def _holding(self, op_id: str, stage: int, epoch: int, host_id: str) -> Operation:
        op = self._runnable(op_id, stage)
        if op.claim_epoch != epoch or op.claim_host != host_id:
            raise ClaimLost(
                f"claimed by {op.claim_host} at epoch {op.claim_epoch}",
                image_id=self.id,
                stage=stage,
            )
        return op

    # --- events ---------------------------------------------------------------------------

    def _trigger(
        self, event_class: type[Image.Event], host_id: str, now: datetime, **fields: Any
    ) -> None:
        self._record(
            event_class(
                originator_id=self.id,
                originator_version=self.version + 1,
                timestamp=now,
                host_id=host_id,
                **fields,
            )
        )

    @property
    def id_text(self) -> str:
        """``str(self.id)``, made once: a UUID's string costs a microsecond, and statuses and
        fixes of a large repository ask for every image's many times. Cached under a private
        name: not part of the folded state (engine/projections/folded_state.py skips those)."""
        text: str | None = self.__dict__.get("_id_text")
        if text is None:
            text = self._id_text = str(self.id)
        return text

    _appliers: ClassVar[Appliers[Image]] = Appliers("Image")

    def apply(self, event: Image.Event) -> None:
        self._appliers(self, event)

    @_appliers.register(ImageRequested)
    def _(self, event: Image.ImageRequested) -> None:
        self.id = event.originator_id
        self.created_on = event.timestamp
        self.created_by = event.host_id
        self.kind = event.kind
        self.size = event.size
        self.chain = list(event.chain)
        self.user_data = event.user_data
        self.strategy = event.strategy
        self.auto_fix = event.auto_fix
        self.origin = dict(event.origin)
        held = not event.auto_fix
        self.operations = [Operation.from_plan(p, held=held) for p in event.operations]
        self.removed = False
        self.prepared_on = set()
        self.attached_on = None
        self.replica_of = event.origin.get("of") if event.origin.get("how") == "replica" else None
        self.replicating_to = None
        self.last_error = None
        self.digests = {}
        self.damage = {}
        self._advance(event)

    @_appliers.register(SnapshotTaken)
    def _(self, event: Image.SnapshotTaken) -> None:
        self.chain = list(event.chain)
        for op in self.operations:
            if op.purpose == ops.OPTIMIZE and not op.finished:
                op.state, op.claim_host = ops.DONE, None
                op.history.append("superseded by a snapshot")
        self.operations.extend(Operation.from_plan(p) for p in event.operations)
        self._advance(event)

    @_appliers.register(FixRequested)
    def _(self, event: Image.FixRequested) -> None:
        if event.operation is not None:
            self.operations.append(Operation.from_plan(event.operation))
        else:
            op = self.operation(event.op_id)
            if op is not None:
                op.state, op.error, op.claim_host = ops.PENDING, None, None
                op.history.append(f"{event.fix_type} requested by {event.host_id}")
        self.last_error = None
        self._advance(event)

    @_appliers.register(StageClaimed)
    def _(self, event: Image.StageClaimed) -> None:
        op = self._op(event.op_id)
        op.claim_host, op.claim_epoch, op.percent = event.host_id, event.epoch, -1
        self._advance(event)

    @_appliers.register(StageProgressed)
    def _(self, event: Image.StageProgressed) -> None:
        self._op(event.op_id).percent = event.percent
        self._advance(event)

    @_appliers.register(StageCheckpointed)
    def _(self, event: Image.StageCheckpointed) -> None:
        op = self._op(event.op_id)
        op.percent = event.percent
        if (op.checkpoint_stage, op.checkpoint_epoch) != (event.stage, event.epoch):
            # An attempt's first checkpoint holds every chunk from the volume's start, those
            # it resumed with included: it replaces what an earlier attempt recorded.
            op.checkpoint_stage, op.checkpoint_epoch = event.stage, event.epoch
            op.checkpoint_chunks = b""
        op.checkpoint_offset = event.offset
        op.checkpoint_chunks += event.chunks
        self._advance(event)

    @_appliers.register(StageCompleted)
    def _(self, event: Image.StageCompleted) -> None:
        op = self._op(event.op_id)
        stage = op.stages[event.stage]
        if "drop_volume" in stage:
            # A merge: drop the merged volume from the chain as it is now, which may have grown
            # a top since the merge was planned (a snapshot meanwhile).
            self.chain = [ref for ref in self.chain if ref != stage["drop_volume"]]
        elif "set_chain" in stage:
            self.chain = list(stage["set_chain"])
        op.done = event.stage + 1
        op.phase = ""
        op.checkpoint_stage, op.checkpoint_epoch = -1, 0
        op.checkpoint_offset, op.checkpoint_chunks = 0, b""
        if self.damage:
            made = stage.get("volume")
            if made in self.damage and ops.produced_by(stage) == made:
                # Made again (a mend): what a deep check found in the old file is gone.
                self.damage = {ref: d for ref, d in self.damage.items() if ref != made}
        # The epoch the stage completed under is its claim's (complete() checks it): set
        # again here so that a replay may leave out the claim, whose every effect this
        # event then overwrites (engine/projections/log_events.py).
        op.claim_host, op.claim_epoch = None, event.epoch
        if op.done >= len(op.stages):
            op.state, op.percent = ops.DONE, 100
        else:
            op.percent = -1  # the next stage has not reported any progress yet
        self._advance(event)

    @_appliers.register(StageFailed)
    def _(self, event: Image.StageFailed) -> None:
        op = self._op(event.op_id)
        op.state, op.error, op.claim_host = ops.FAILED, event.error, None
        self.last_error = (
            f"stage {event.stage + 1}/{len(op.stages)} failed on {event.host_id}: {event.error}"
        )
        self._advance(event)

    @_appliers.register(FixStopped)
    def _(self, event: Image.FixStopped) -> None:
        op = self._op(event.op_id)
        op.state, op.claim_host = ops.STOPPED, None
        op.error = f"stopped by {event.host_id}: {event.reason or 'no reason given'}"
        self.last_error = op.error
        self._advance(event)

    @_appliers.register(DamageFound)
    def _(self, event: Image.DamageFound) -> None:
        record: DamageRecord = {
            "ranges": [list(r) for r in event.ranges],
            "detail": event.detail,
            "found_on": event.timestamp,
            "found_by": event.host_id,
        }
        self.damage = {**self.damage, event.volume: record}
        self._advance(event)

    @_appliers.register(ChainChanged)
    def _(self, event: Image.ChainChanged) -> None:
        self.chain = list(event.chain)
        self._advance(event)

    @_appliers.register(ImageRemoved)
    def _(self, event: Image.ImageRemoved) -> None:
        self.removed = True
        for op in self.operations:
            if op.state != _DONE and all(s.get("do") == "digest" for s in op.stages[op.done :]):
                # Its only work left is a digest, which a removed image's volume does not get
                # (docs/adr/0031: once no live image reads it, a block job may write into it).
                # Ended with nothing changed, as an abort ends a job: a digest running now is
                # cancelled, its completion refused, and the queue behind it (a clean) runs.
                op.state, op.claim_host, op.aborted, op.phase = _DONE, None, True, ""
                op.history.append(f"ended by the removal of its image, by {event.host_id}")
        self._advance(event)

    @_appliers.register(UserDataSet)
    def _(self, event: Image.UserDataSet) -> None:
        self.user_data = event.user_data
        self._advance(event)

    @_appliers.register(ImagePrepared)
    def _(self, event: Image.ImagePrepared) -> None:
        self.prepared_on.add(event.host_id)
        self._advance(event)

    @_appliers.register(ImageTornDown)
    def _(self, event: Image.ImageTornDown) -> None:
        self.prepared_on.discard(event.host_id)
        if self.attached_on == event.host_id:
            self.attached_on = None
        self._advance(event)

    @_appliers.register(ImageAttached)
    def _(self, event: Image.ImageAttached) -> None:
        self.prepared_on.add(event.host_id)
        self.attached_on = event.host_id
        self._advance(event)

    @_appliers.register(AttachmentReleased)
    def _(self, event: Image.AttachmentReleased) -> None:
        self.prepared_on.discard(event.of_host)
        if self.attached_on == event.of_host:
            self.attached_on = None
        self._advance(event)

    @_appliers.register(OperationRequested)
    def _(self, event: Image.OperationRequested) -> None:
        self.operations.append(Operation.from_plan(event.operation))
        self.last_error = None
        self._advance(event)

    @_appliers.register(StageReached)
    def _(self, event: Image.StageReached) -> None:
        self._op(event.op_id).phase = event.phase
        self._advance(event)

    @_appliers.register(OperationAborted)
    def _(self, event: Image.OperationAborted) -> None:
        op = self._op(event.op_id)
        op.state, op.claim_host, op.aborted, op.phase = ops.DONE, None, True, ""
        op.history.append(f"aborted by {event.host_id}: {event.reason or 'no reason given'}")
        self._advance(event)

    @_appliers.register(ReplicationStarted)
    def _(self, event: Image.ReplicationStarted) -> None:
        self.replicating_to = event.target
        self._advance(event)

    @_appliers.register(ReplicationEnded)
    def _(self, event: Image.ReplicationEnded) -> None:
        self.replicating_to = None
        self._advance(event)

    @_appliers.register(ReplicaSwitched)
    def _(self, event: Image.ReplicaSwitched) -> None:
        self.replica_of = None
        if event.attached:
            self.prepared_on.add(event.host_id)
            self.attached_on = event.host_id
        self.operations.extend(Operation.from_plan(p) for p in event.operations)
        self.last_error = None
        self._advance(event)

    @_appliers.register(ReplicaRenewed)
    def _(self, event: Image.ReplicaRenewed) -> None:
        self.size = event.size
        self.chain = list(event.chain)
        self.user_data = event.user_data
        self.origin = dict(event.origin)
        self.replica_of = event.origin.get("of")
        self.removed = False
        self.prepared_on = set()
        self.attached_on = None
        self.last_error = None
        self.digests = {}
        self._advance(event)

    @_appliers.register(ImageResized)
    def _(self, event: Image.ImageResized) -> None:
        self.size = event.size
        self.operations.append(Operation.from_plan(event.operation))
        self._advance(event)

    @_appliers.register(VolumeDigested)
    def _(self, event: Image.VolumeDigested) -> None:
        record: DigestRecord = {
            "size": event.size,
            "chunk_size": event.chunk_size,
            "chunks": event.chunks,
            "digest": event.digest,
        }
        # Replaced, never changed in place: the view hands out images that others read.
        self.digests = {**self.digests, event.volume: record}
        self._advance(event)

    def _op(self, op_id: str) -> Operation:
        op = self.operation(op_id)
        if op is None:  # the log holds an event for an operation it never planned
            raise ValueError(f"image {self.id} has no operation {op_id}")
        return op

    def _advance(self, event: Image.Event) -> None:
        self.version = event.originator_version
        self.modified_on = event.timestamp
        self.last_host = event.host_id
