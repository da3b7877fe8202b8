"""The deep check's command: queue a ``verify`` operation on a new carrier (docs/adr/0033).

A deep check reads every byte of the repository's volumes, so it is durable work like any
other: one operation whose one stage any host's executor may run, with progress, a stop and a
takeover after a crash. It belongs to no image, so it runs on a *carrier*, an image requested
and removed in one transaction (as a ``clean`` of files of no image does: ADR 0017), which no
listing shows and which only its id, given back here, reaches.

Imports: :mod:`engine.aggregates`, :mod:`engine.service.fix_handlers` and
:mod:`engine.service.unit_of_work`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import VerifyStage
from engine.service.fix_handlers import new_carrier
from engine.service.unit_of_work import ImageService

# What a deep check's carrier was made for (``Image.origin["how"]``).
DEEP_CHECK = "deep check"


@dataclass(frozen=True, slots=True)
class DeepCheck:
    """A deep check queued: its carrier image and its operation."""

    image_id: uuid.UUID
    op_id: str


def start_deep_check(service: ImageService, stage: VerifyStage) -> DeepCheck:
    """Queue the deep check ``stage`` on a new carrier; durable when this returns."""
    check = DeepCheck(uuid.uuid4(), uuid.uuid4().hex)
    operations = [ops.plan(check.op_id, ops.Purpose.VERIFY, stage)]
    service.add(
        new_carrier(service, check.image_id, DEEP_CHECK, operations, "the carrier of a deep check")
    )
    return check


def is_deep_check(image: Image) -> bool:
    """Whether the image is a deep check's carrier."""
    return image.removed and image.origin.get("how") == DEEP_CHECK
