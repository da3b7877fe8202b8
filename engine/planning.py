"""What each call asks of the storage, as operations and stages (ADR 0004). Pure.

The facade finds the images involved and makes the ids; these functions decide the volumes,
their formats and the order of the work, by strategy:

* ``space`` prefers thin qcow2 volumes and overlays on shared snapshots;
* ``performance`` prefers one standalone, preallocated raw volume per disk, reached through the
  quick form first (an overlay: the disk is ``degraded``) and an ``optimize`` operation after.

Each stage is written in its kind's typed form (engine/aggregates/stage_kinds.py), with its keys
in the order the log has always held them: a fix's id is a hash of its stages' bytes.

Imports: the aggregates only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from engine.aggregates import operations as ops
from engine.aggregates.operations import OperationPlan, Purpose, plan, volume_ref
from engine.aggregates.stage_kinds import (
    CopyStage,
    CreateStage,
    DiffStage,
    DigestStage,
    ResizeStage,
)

NewVolume = Callable[[str], str]  # format -> a fresh volume ref


def fresh_volume(fmt: str) -> str:
    return volume_ref(uuid.uuid4().hex, fmt)


def op_id() -> str:
    return uuid.uuid4().hex


def blank_disk(
    size: int, strategy: str, new: NewVolume = fresh_volume
) -> tuple[list[str], list[OperationPlan]]:
    """A disk with no base: thin qcow2 for space, a preallocated raw volume for performance."""
    stage: CreateStage
    if strategy == ops.PERFORMANCE:
        volume = new("raw")
        stage = {"do": "create", "volume": volume, "size": size, "preallocate": True}
    else:
        volume = new("qcow2")
        stage = {"do": "create", "volume": volume, "size": size}
    return [volume], [plan(op_id(), Purpose.CREATE, stage)]


def disk_on_snapshot(
    size: int,
    snapshot_chain: list[str],
    strategy: str,
    image_id: uuid.UUID,
    new: NewVolume = fresh_volume,
) -> tuple[list[str], list[OperationPlan]]:
    """A disk whose first content is a snapshot's: an overlay on the snapshot's top volume."""
    overlay = new("qcow2")
    chain = [*snapshot_chain, overlay]
    work = [plan(op_id(), Purpose.CREATE, overlay_stage(overlay, snapshot_chain[-1], size))]
    if strategy == ops.PERFORMANCE:
        work.append(optimize_plan(image_id, new))
    return chain, work


def overlay_stage(volume: str, backing: str, size: int) -> CreateStage:
    return {"do": "create", "volume": volume, "size": size, "backing": backing}


def optimize_plan(
    image_id: uuid.UUID, new: NewVolume = fresh_volume, *, op: str | None = None
) -> OperationPlan:
    """Flatten the image's chain into one preallocated raw volume, then use only that."""
    flat = new("raw")
    stage: CopyStage = {
        "do": "copy",
        "source_image": str(image_id),
        "volume": flat,
        "preallocate": True,
        "set_chain": [flat],
    }
    return plan(op or op_id(), ops.OPTIMIZE, stage)


def snapshot_of_disk(
    disk_id: uuid.UUID,
    disk_chain: list[str],
    disk_size: int,
    strategy: str,
    new: NewVolume = fresh_volume,
) -> tuple[str, list[OperationPlan]]:
    """The disk's new top overlay and the work it needs after its chain is frozen."""
    top = new("qcow2")
    work = [plan(op_id(), Purpose.SNAPSHOT, overlay_stage(top, disk_chain[-1], disk_size))]
    if strategy == ops.PERFORMANCE:
        work.append(optimize_plan(disk_id, new))
    return top, work


def snapshot_digest(frozen_chain: list[str], new_top: str) -> OperationPlan:
    """The snapshot's own work: the digest of the volume it makes immutable, its top (ADR
    0031). It waits for the disk's ``new_top``: until the disk writes there, a virtual machine
    attached to it may still write to the snapshot's top. The volume below, if any, lends its
    recorded digest to the chunks the top does not allocate."""
    stage: DigestStage = {"do": "digest", "volume": frozen_chain[-1]}
    if len(frozen_chain) > 1:
        stage["backing"] = frozen_chain[-2]
    stage["frozen_by"] = new_top
    return plan(op_id(), Purpose.SNAPSHOT, stage)


def full_copy(
    source_id: uuid.UUID, strategy: str, new: NewVolume = fresh_volume
) -> tuple[list[str], list[OperationPlan]]:
    """A standalone copy of an image's content: sparse qcow2 for space, raw for performance."""
    stage: CopyStage
    if strategy == ops.PERFORMANCE:
        volume = new("raw")
        stage = {
            "do": "copy",
            "source_image": str(source_id),
            "volume": volume,
            "preallocate": True,
        }
    else:
        volume = new("qcow2")
        stage = {"do": "copy", "source_image": str(source_id), "volume": volume}
    return [volume], [plan(op_id(), Purpose.COPY, stage)]


def incremental_copy(
    source_id: uuid.UUID,
    base_chain: list[str],
    strategy: str,
    image_id: uuid.UUID,
    new: NewVolume = fresh_volume,
) -> tuple[list[str], list[OperationPlan]]:
    """Only what the source holds that differs from the base (an incremental backup).

    The transfer is always the difference; with ``performance`` the copy is then flattened
    into its own raw volume, like any other disk of that strategy.
    """
    diff = new("qcow2")
    stage: DiffStage = {
        "do": "diff",
        "source_image": str(source_id),
        "base": base_chain[-1],
        "volume": diff,
    }
    work = [plan(op_id(), Purpose.COPY, stage)]
    if strategy == ops.PERFORMANCE:
        work.append(optimize_plan(image_id, new))
    return [*base_chain, diff], work


def resize(top: str, size: int) -> OperationPlan:
    stage: ResizeStage = {"do": "resize", "volume": top, "size": size}
    return plan(op_id(), Purpose.RESIZE, stage)
