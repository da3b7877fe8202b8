"""The fix commands: start a fix that a check offered, stop the work on an image.

Whether a fix still applies is decided first, against the view, when its opaque data is decoded
(engine/projections/fix_tokens.py): the result is a :class:`FixPlan`, this module's command. A
handler then queues the plan's operation, releases the blocked one or removes the image, through
the unit of work, so the aggregate decides again on fresh state if another host got there first.

Imports: :mod:`engine.aggregates`, :mod:`engine.errors` and :mod:`engine.service.unit_of_work`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.errors import ConcurrencyConflict
from engine.service.unit_of_work import ImageService


@dataclass(frozen=True, slots=True)
class FixPlan:
    """A decoded, checked fix: queue ``operation`` on ``target`` (or release ``op_id``)."""

    type: str
    target: uuid.UUID
    op_id: str
    operation: ops.OperationPlan | None  # None: release the held, failed or stopped op_id
    new_carrier: bool  # the target is to be created (requested and removed) with the operation
    already_queued: bool  # nothing to do: this very work is queued, running or done
    images: dict[str, int]  # the versions the check saw
    remove: str | None = None  # remove the image for this reason (its data is lost)


def start_fix(service: ImageService, plan: FixPlan) -> bool:
    """Start a fix: True if this call queued (or released) the work, False if it already was."""
    if plan.already_queued:
        return False
    if plan.remove is not None:
        reason = plan.remove
        service.update(
            plan.target,
            lambda image: image.remove(host_id=service.host_id, now=service.now(), reason=reason),
        )
        return True
    if plan.new_carrier:
        operations = [plan.operation] if plan.operation is not None else []
        carrier = new_carrier(service, plan.target, "clean carrier", operations)
        try:
            service.add(carrier)
        except ConcurrencyConflict:
            return False  # another host started the same fix a moment ago
        return True

    def command(image: Image) -> bool:
        return image.request_fix(
            fix_type=plan.type,
            op_id=plan.op_id,
            operation=plan.operation,
            host_id=service.host_id,
            now=service.now(),
        )

    return service.update(plan.target, command)


def stop_fix(service: ImageService, image_id: uuid.UUID, reason: str) -> None:
    """Stop the work in progress on an image; it can later be mended or removed."""
    service.update(
        image_id, lambda i: i.stop(reason=reason, host_id=service.host_id, now=service.now())
    )


def new_carrier(
    service: ImageService,
    image_id: uuid.UUID,
    how: str,
    operations: list[ops.OperationPlan],
    reason: str = "",
) -> Image:
    """An image requested and removed in one transaction, carrying ``operations`` that belong
    to no image (a clean of files nobody owns, a deep check): seen by nobody but executors.
    Not added yet: the caller adds it, and decides what a conflict means."""
    now = service.now()
    carrier = Image.request(
        image_id=image_id,
        kind=ops.SNAPSHOT,
        size=0,
        chain=[],
        user_data=None,
        strategy=ops.SPACE,
        auto_fix=True,
        origin={"how": how},
        operations=operations,
        host_id=service.host_id,
        now=now,
    )
    carrier.remove(host_id=service.host_id, now=now, reason=reason)
    return carrier
