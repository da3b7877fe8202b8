"""What work will still run, and which volumes it needs: the executors' and the fixes' rules.

Pure domain rules over :class:`~engine.aggregates.image.Image` and its operations. Work on a
removed image runs only when it is a ``clean``, a ``merge`` or a deep check's ``verify`` (on its
carrier: docs/adr/0033), or when it makes a volume that work
which will run reads (:func:`needed_volumes`): data is freed only once nothing depends on it
(docs/adr/0017-nothing-stuck-without-a-reason.md). The executors decide what to claim with these
rules and the check decides what to offer with the same ones.

Imports: the aggregates only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Iterator

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation, Purpose
from engine.aggregates.stage_kinds import VOLUME_KEYS as VOLUME_KEYS
from engine.aggregates.stage_kinds import Stage

# A deep check runs on a removed carrier too: it changes nothing, and frees nothing.
RUN_ON_REMOVED = (ops.CLEAN, ops.MERGE, Purpose.VERIFY)
BLOCKED = (ops.FAILED, ops.STOPPED, ops.HELD)  # waiting for a fix


def will_run(image: Image, op: Operation, needed: Collection[str] = frozenset()) -> bool:
    """Whether an unfinished operation will still run.

    A removed image's own work is void, except its clean and merge, and except work making a
    volume that is ``needed`` (:func:`needed_volumes`): a live chain holds it (a snapshot or
    clone taken before the removal builds on it), or work that will run reads it (a copy of the
    removed image). An operation runs too when a later one of its image does: a queue runs in
    order.
    """
    if op.finished:
        return False
    if not image.removed or op.purpose in RUN_ON_REMOVED:
        return True
    if not needed:
        return False
    later = False
    for each in image.operations:
        later = later or each is op
        if later and not each.finished and _makes_any(each, needed):
            return True
    return False


def _makes_any(op: Operation, needed: Collection[str]) -> bool:
    return any(ops.produced_by(stage) in needed for stage in op.stages[op.done :])


def stage_reads(stage: Stage, image_of: Callable[[object], Image | None]) -> list[str]:
    """The volumes of this repository a stage reads or makes: the ones its keys name, and the
    whole chain of the image it copies from (``image_of`` finds it, removed or not)."""
    refs = [ref for ref in (stage.get(key) for key in VOLUME_KEYS) if isinstance(ref, str)]
    source = image_of(stage.get("source_image"))
    if source is not None:
        refs += source.chain
    return refs


def needed_volumes(
    images: Iterable[Image],
    elsewhere: Collection[str] = (),
    *,
    by_id: dict[uuid.UUID, Image] | None = None,
) -> set[str]:
    """Volumes that must stay, and be made if they are not yet: the chains of live images, what
    their unfinished work reads (a copy reads its source's whole chain, removed or not), what
    work elsewhere reads (``elsewhere``: other repositories' copies of images here), and, until
    nothing changes, what the work of removed images that makes any of those reads."""
    listed = images if isinstance(images, list) else list(images)
    index = by_id if by_id is not None else {i.id: i for i in listed}

    def image_of(image_id: object) -> Image | None:
        try:
            return index.get(uuid.UUID(str(image_id))) if image_id else None
        except ValueError:
            return None

    needed = set(elsewhere)
    waiting: list[Image] = []
    done = ops.DONE
    for image in listed:
        if image.removed:
            if any(
                op.state != done and op.purpose not in RUN_ON_REMOVED for op in image.operations
            ):
                waiting.append(image)
            continue
        needed.update(image.chain)
        for op in image.operations:
            if op.state != done:
                for stage in op.stages[op.done :]:
                    needed.update(stage_reads(stage, image_of))
    grew = True
    while grew and waiting:
        grew = False
        for image in list(waiting):
            running = [op for op in image.operations if not op.finished]
            if any(_makes_any(op, needed) for op in running):
                waiting.remove(image)
                for op in running:
                    for stage in op.stages[op.done :]:
                        needed.update(stage_reads(stage, image_of))
                grew = True
    return needed


def release_type(
    image: Image, op: Operation, needed: Collection[str] = frozenset()
) -> Purpose | None:
    """The fix that releases a blocked operation, or None when nothing may release it. A
    removed image's work that makes a ``needed`` volume is mended like a live image's."""
    if op.purpose == Purpose.VERIFY:
        return None  # a stopped or failed deep check is not resumed: a new one is asked for
    if op.purpose in (ops.OPTIMIZE, ops.CLEAN, ops.MERGE):
        return Purpose(op.purpose) if not image.removed or op.purpose in RUN_ON_REMOVED else None
    if image.removed:
        return ops.MEND if will_run(image, op, needed) else None
    return ops.MEND


def merge_chain_changes(images: Iterable[Image], volume: str) -> dict[uuid.UUID, list[str]]:
    """Each live image whose chain holds ``volume``, and its chain without it.

    What a merge's last stage should record when it completes, computed on the images as they
    are then (a snapshot taken meanwhile has added a top that a chain computed earlier lacks).
    """
    return {i.id: chain for i, chain in chains_without(images, volume)}


def chains_without(images: Iterable[Image], volume: str) -> Iterator[tuple[Image, list[str]]]:
    for i in images:
        if not i.removed and volume in i.chain:
            yield i, [ref for ref in i.chain if ref != volume]


def attached_holders(images: Iterable[Image | None], volume: str) -> Iterator[Image]:
    """The live images attached on some host whose chain holds ``volume``: whose daemon a
    stage changing that volume must go through (docs/adr/0028)."""
    for image in images:
        if (
            image is not None
            and image.attached_on is not None
            and not image.removed
            and volume in image.chain
        ):
            yield image


def synced_volumes(image: Image) -> set[str]:
    """The volumes a migration's finished sync stages copied into the image's current replica
    (those since the operation that began the replication: docs/adr/0029)."""
    starts = [i for i, op in enumerate(image.operations) if op.purpose in _REPLICATION_STARTS]
    done: set[str] = set()
    for op in image.operations[starts[-1] if starts else 0 :]:
        if op.purpose not in (ops.Purpose.SYNC, ops.Purpose.MIGRATE) or op.aborted:
            continue
        for stage in op.stages[: op.done]:
            volumes = stage.get("volumes") if stage.get("do") == "sync" else None
            if isinstance(volumes, list):
                done.update(v for v in volumes if isinstance(v, str))
    return done


_REPLICATION_STARTS = (ops.Purpose.CLONE, ops.Purpose.MIGRATE)
