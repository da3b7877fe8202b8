"""What a running stage appends under its claim: throttled progress, then its outcome.

Every append names the claim (operation, stage, epoch). Once the claim has moved on (another
host took it, the operation was stopped or superseded) the image refuses the append with
``ClaimLost``, so a host never records progress or an outcome for work that is no longer its own.

qemu-img reports every percent; the log should not hold a hundred events per copy
(architecture §3), so :class:`StageProgress` saves a report only when its whole percent moved and
``interval`` seconds passed since the last save. The first report is saved at once: it tells a
user that the data work has started. 100 is never saved: ``StageCompleted`` says it.

Saving progress is also how a stage learns that it must stop: when the save is refused, the
callback raises :class:`~engine.errors.StageCancelled`, which makes the adapter kill qemu-img.
The executor can also cancel directly (``Claim.cancel``): for a stop it saw in the log before
the next save, or when the host itself stops.

A copy saves checkpoints instead (:meth:`Claim.checkpoint`, docs/adr/0032): each says how far
its data is durable, so a later attempt resumes there; it is the copy's throttled progress too,
refused like a progress save once the claim moved on. The digest a copy of an immutable volume
computed on the way is kept by the claim (:meth:`Claim.keep_digest`) and recorded with the
stage's completion, in the same transaction.

Before a stage writes anything other hosts read (publishes a volume, rewrites one in place,
deletes files), it calls :meth:`Claim.confirm`: the claim is read again from the log, and this
host's lease must not have lapsed since the claim was made (docs/adr/0005). A host that was
paused past ``lease_timeout`` and resumed therefore learns that it may have been counted dead
before it touches anything, even if nobody took its claim yet.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.service``,
``engine.formats`` (a digest's type only); the standard library.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Checkpoint, Operation, Stage
from engine.aggregates.work_rules import merge_chain_changes
from engine.errors import ClaimLost, StageCancelled
from engine.executors import crashpoints as points
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.executors.stage_run import Damage
from engine.service.unit_of_work import ImageService

if TYPE_CHECKING:
    from engine.formats.qemu.digests import VolumeDigest


class Lease(Protocol):
    """This host's liveness in the claim's repository (engine.executors.liveness.HostLease)."""

    def term(self) -> int: ...
    def fresh(self) -> bool: ...


@dataclass
class Claim:
    """A stage this host claimed at ``epoch``, in its lease's ``term``."""

    service: ImageService
    host_id: str
    image_id: uuid.UUID
    op_id: str
    index: int
    epoch: int
    stage: Stage
    cancel: threading.Event = field(default_factory=threading.Event)
    lease: Lease | None = None
    term: int = 0
    crashpoints: CrashPoints = DISARMED
    phase: str = ""  # what the log says the stage reached before this attempt (a live stage)
    # The digest of the volume this attempt made, recorded with its completion.
    digest: tuple[str, VolumeDigest] | None = None

    def progress(self, interval: float) -> StageProgress:
        """The callback to hand to qemu-img for this attempt."""
        return StageProgress(self, interval=interval)

    def save_progress(self, percent: int) -> None:
        def command(image: Image) -> None:
            image.progress(
                op_id=self.op_id,
                stage=self.index,
                epoch=self.epoch,
                percent=percent,
                host_id=self.host_id,
                now=self.service.now(),
            )

        self.crashpoints(points.BEFORE_PROGRESS)
        self.service.update(self.image_id, command)
        self.crashpoints(points.AFTER_PROGRESS)

    def checkpoint(self, *, offset: int, percent: int, chunks: bytes, written: int) -> None:
        """StageCheckpointed: the copy is durable up to ``offset`` (docs/adr/0032). Raises
        StageCancelled, and cancels this attempt, once the claim has moved on."""
        if self.cancel.is_set():
            raise self.cancelled("this host cancelled it")

        def command(image: Image) -> None:
            image.checkpoint(
                op_id=self.op_id,
                stage=self.index,
                epoch=self.epoch,
                offset=offset,
                percent=percent,
                chunks=chunks,
                written=written,
                host_id=self.host_id,
                now=self.service.now(),
            )

        self.crashpoints(points.BEFORE_PROGRESS)
        try:
            self.service.update(self.image_id, command)
        except ClaimLost as e:
            self.cancel.set()
            raise self.cancelled(e.message) from e
        self.crashpoints(points.AFTER_PROGRESS)

    def last_checkpoint(self) -> Checkpoint | None:
        """The stage's last checkpoint, as the log holds it: an earlier attempt's, from which
        this one may resume."""
        op = self.service.get(self.image_id).operation(self.op_id)
        return None if op is None else op.checkpoint(self.index)

    def keep_digest(self, volume: str, digest: VolumeDigest) -> None:
        """Record ``digest`` of ``volume`` with the stage's completion."""
        self.digest = (volume, digest)

    def reach(self, phase: str) -> None:
        """StageReached: durable before the step it names is taken (docs/adr/0028)."""

        def command(image: Image) -> None:
            image.reach(
                op_id=self.op_id,
                stage=self.index,
                epoch=self.epoch,
                phase=phase,
                host_id=self.host_id,
                now=self.service.now(),
            )

        try:
            self.service.update(self.image_id, command)
        except ClaimLost as e:
            self.cancel.set()
            raise self.cancelled(f"the claim moved on: {e.message}") from e

    def confirm(self) -> None:
        """Raise StageCancelled unless this attempt may still write what other hosts read: the
        log says the claim is still ours, and our lease neither lapsed since the claim nor is
        about to (checked last, right before the write it guards)."""
        if self.cancel.is_set():
            raise self.cancelled("this host cancelled it")
        op = self.service.get(self.image_id).operation(self.op_id)
        if not self._holds(op):
            self.cancel.set()
            where = "gone" if op is None else f"{op.state}, claimed by {op.claim_host}"
            raise self.cancelled(f"the claim moved on: the operation is {where}")
        if self.lease is not None and (self.lease.term() != self.term or not self.lease.fresh()):
            self.cancel.set()
            raise self.cancelled(
                "this host's lease lapsed (it could not renew its heartbeat in time), so "
                "another host may have taken the stage over"
            )

    def moved_on(self) -> bool:
        """Whether the log ended this claim: the operation was stopped, aborted or is done,
        or another claim holds the stage. (A host that only stops its engine has not.)"""
        return not self._holds(self.service.get(self.image_id).operation(self.op_id))

    def _holds(self, op: Operation | None) -> bool:
        """Whether ``op``, as the log has it, is still at this attempt's stage under its claim."""
        return (
            op is not None
            and op.state == ops.PENDING
            and op.done == self.index
            and (op.claim_host, op.claim_epoch) == (self.host_id, self.epoch)
        )

    def superseded(self) -> bool:
        """Whether the log moved past this attempt: another claim (of any host) or the
        stage's completion. A stopped operation is not superseded: its claim stands."""
        op = self.service.get(self.image_id).operation(self.op_id)
        return op is None or op.claim_epoch > self.epoch or op.done > self.index

    def cancelled(self, why: str) -> StageCancelled:
        return StageCancelled(why, image_id=self.image_id, op_id=self.op_id, stage=self.index)

    def complete(
        self,
        chain_changes: dict[uuid.UUID, list[str]],
        *,
        drop_volume: str | None = None,
        damage: Sequence[Damage] = (),
    ) -> bool:
        """StageCompleted, with other images' new chains in the same transaction. False if
        the claim had moved on: the log keeps the other host's (or the stop's) word.

        The digest the stage kept (:meth:`keep_digest`: a volume of this image it made
        immutable) is recorded as ``VolumeDigested`` in the same transaction (docs/adr/0031).

        With ``drop_volume`` (a merge), each of those images' chain is recomputed as it is now,
        without that volume: a snapshot taken since the plan gave it a top the plan lacks.
        ``damage``: what a deep check found, recorded on each volume's owner in the same
        transaction (docs/adr/0033).
        """
        reason = f"stage {self.index + 1} of operation {self.op_id} on image {self.image_id}"
        kept = self.digest
        owners = [i for i in dict.fromkeys(d.owner for d in damage) if i != self.image_id]
        changed = [i for i in chain_changes if i not in owners]

        def command(images: list[Image]) -> None:
            now = self.service.now()
            images[0].complete(
                op_id=self.op_id, stage=self.index, epoch=self.epoch, host_id=self.host_id, now=now
            )
            if kept is not None:
                volume, found = kept
                images[0].record_digest(
                    volume=volume,
                    size=found.size,
                    chunk_size=found.chunk_size,
                    chunks=found.chunks,
                    digest=found.digest,
                    host_id=self.host_id,
                    now=now,
                )
            if damage:
                _record_damage(images, damage, self.host_id, now)
            others = [i for i in images[1:] if i.id in chain_changes]
            if drop_volume is not None:
                changes = merge_chain_changes(others, drop_volume)
            else:
                changes = {other.id: chain_changes[other.id] for other in others}
            for other in others:
                if other.id in changes:
                    chain = changes[other.id]
                    other.change_chain(chain=chain, reason=reason, host_id=self.host_id, now=now)

        try:
            self.service.update_many([self.image_id, *changed, *owners], command)
        except ClaimLost:
            return False
        return True

    def fail(self, error: str) -> bool:
        """StageFailed with ``error`` as its sentence; False if the claim had moved on."""

        def command(image: Image) -> None:
            image.fail(
                op_id=self.op_id,
                stage=self.index,
                epoch=self.epoch,
                error=error,
                host_id=self.host_id,
                now=self.service.now(),
            )

        try:
            self.service.update(self.image_id, command)
        except ClaimLost:
            return False
        return True


def _record_damage(
    images: list[Image], damage: Sequence[Damage], host_id: str, now: datetime
) -> None:
    by_id = {image.id: image for image in images}
    for found in damage:
        by_id[found.owner].record_damage(
            volume=found.volume,
            ranges=found.ranges,
            detail=found.detail,
            host_id=host_id,
            now=now,
        )


class StageProgress:
    """Call with a percentage (0..100); raises StageCancelled when the stage must stop."""

    def __init__(
        self,
        claim: Claim,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._claim = claim
        self._interval = interval
        self._clock = clock
        self._saved: int | None = None
        self._saved_at = 0.0

    def __call__(self, percent: float) -> None:
        claim = self._claim
        if claim.cancel.is_set():
            raise claim.cancelled("this host cancelled it")
        whole = max(0, min(100, int(percent)))
        now = self._clock()
        if whole == 100 or whole == self._saved:
            return
        if self._saved is not None and now - self._saved_at < self._interval:
            return
        try:
            claim.save_progress(whole)
        except ClaimLost as e:
            claim.cancel.set()
            raise claim.cancelled(e.message) from e
        self._saved, self._saved_at = whole, now
