"""An image's status (architecture §1), derived from its state and the view's.

``broken``: the image cannot be used now: a volume of its chain is not produced yet (by its own
or another image's unfinished stage), is lost (``lost``: found missing or corrupt by a check), was
found rotten or corrupt by a deep check (``DamageFound`` in the log: ``last_error`` says which
volume and where, docs/adr/0033), or the operation in progress failed, was stopped, or waits for
a fix (``auto_fix=False``).

A snapshot whose only unfinished work is the digest of its volume (docs/adr/0031) is usable:
its data is in place; its stage ``X/Y`` still shows that work, and a digest that failed leaves
its ``last_error`` and a ``mend`` that runs it again.

``degraded``: usable, and a better representation is planned or possible: an ``optimize``
operation is queued (held, failed or stopped included: the quick form it improves on is in place
and usable), or a ``performance`` virtual disk is not one raw volume yet.

``optimized`` otherwise. A ``clean`` operation never changes the status: it frees files the image
does not use. See docs/adr/0004-images-volumes-operations-and-stages.md.

Imports: :mod:`engine.aggregates` and :mod:`engine.types`; the view only through
:class:`StatusView`.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from typing import Protocol

from engine.aggregates import operations as ops
from engine.aggregates.image import DamageRecord, Image
from engine.aggregates.operations import Operation
from engine.aggregates.stage_kinds import other_reads
from engine.types import BROKEN, DEGRADED, OPTIMIZED, ImageStatus


class StatusView(Protocol):
    """What a status reads of the other images: the view (engine/projections/view.py) is one.
    A Protocol, so this module does not import the view that imports it."""

    def image(self, image_id: uuid.UUID | str) -> Image | None: ...

    def worker(self, image_id: uuid.UUID) -> str | None: ...

    def producer_of(self, volume: str) -> Image | None: ...

    def is_ready(self, volume: str) -> bool: ...

    def damaged(self) -> Mapping[str, DamageRecord]:
        """Volumes a deep check found damaged, not made again since (docs/adr/0033)."""
        ...


_BLOCKED = (ops.FAILED, ops.STOPPED, ops.HELD)
# Operations that leave the image's data usable while they wait, fail or are stopped.
_HARMLESS = (ops.OPTIMIZE, ops.CLEAN)


def image_status(
    image: Image,
    view: StatusView,
    lost: Collection[str] = (),
    faults: Mapping[str, str] | None = None,
) -> ImageStatus:
    """The status of a (live) image.

    ``host_id`` is the last host that claimed or ran a stage of the image, or the host that
    requested it when none did yet: the API's "the last host to try and optimize or fix the
    image", which a host that merely set user data or prepared it is not.

    ``faults``: volumes of the image found missing or damaged, each with a sentence that says
    so; the image is then broken, and ``last_error`` is that sentence (ADR 0017).
    """
    fields = status_fields(image, view, lost)
    if faults:
        for ref in image.chain:
            if ref in faults:
                return ImageStatus(fields[0], BROKEN, *fields[2:5], faults[ref])
    return ImageStatus(*fields)


def status_fields(
    image: Image, view: StatusView, lost: Collection[str] = (), *, removed: str | None = None
) -> tuple[str, str, str | None, str, int, str | None]:
    """:class:`ImageStatus`'s fields in order, for callers that copy them elsewhere (a
    summary of every image of a large repository: no frozen dataclass built per image).
    ``removed``: the status to give a removed image instead of working one out."""
    current = image.current_operation()
    last_error = image.last_error
    if removed is not None and image.removed:
        status = removed
    elif (rot := rot_of(image, view)) is not None:
        status, last_error = BROKEN, rot
    else:
        status = _status(image, current, view, lost)
    return (
        image.id_text,
        status,
        view.worker(image.id) or image.created_by,
        _stage(image, current),
        _percent(image, current),
        last_error,
    )


def rot_of(image: Image, view: StatusView) -> str | None:
    """The sentence for the lowest volume of the image's chain that a deep check found
    damaged (recorded in the log, so every host says it), or None (docs/adr/0033)."""
    damaged = view.damaged()
    if damaged:
        for ref in image.chain:
            record = damaged.get(ref)
            if record is not None:
                return damage_sentence(ref, record)
    return None


def damage_sentence(ref: str, record: DamageRecord) -> str:
    """What ``last_error`` says of a volume a deep check found damaged."""
    found = (
        f"found by the deep check of {record['found_on'].isoformat(timespec='seconds')} on "
        f"{record['found_by']}"
    )
    if record["ranges"]:
        where = ", ".join(f"{start}-{end}" for start, end in record["ranges"])
        return (
            f"volume {ref} is rotten: {record['detail']} at bytes {where} ({found}); check the "
            "repository for a fix"
        )
    return f"volume {ref} is damaged: {record['detail']} ({found}); check the repository for a fix"


def is_usable(image: Image, view: StatusView, lost: Collection[str] = ()) -> bool:
    if rot_of(image, view) is not None:
        return False
    return _status(image, image.current_operation(), view, lost) != BROKEN


def _status(
    image: Image, current: Operation | None, view: StatusView, lost: Collection[str]
) -> str:
    for ref in image.chain:
        if not view.is_ready(ref) or ref in lost:
            return BROKEN
    if current is not None and current.state in _BLOCKED and not _harmless(current):
        return BROKEN
    if current is not None and any(
        op.purpose == ops.OPTIMIZE and not op.finished for op in image.operations
    ):
        return DEGRADED
    if wants_optimizing(image):
        return DEGRADED
    return OPTIMIZED


def _harmless(op: Operation) -> bool:
    """Whether the operation leaves the image's data usable while it waits, fails or is
    stopped: an optimize or a clean, or one whose only unfinished work is a digest (of a
    snapshot's volume, already in place: docs/adr/0031)."""
    if op.purpose in _HARMLESS:
        return True
    return all(stage.get("do") == "digest" for stage in op.stages[op.done :])


def blocker(image: Image, view: StatusView) -> str | None:
    """Why the image's work cannot go on until a fix runs elsewhere, or None: a volume it holds
    or its next stage reads is to be made by another image's work, which waits for a fix."""
    refs = [ref for ref in image.chain if not view.is_ready(ref)]
    current = image.current_operation()
    if current is not None and current.state == ops.PENDING and current.current_stage:
        stage = current.current_stage
        refs += [ref for ref in other_reads(stage) if not view.is_ready(ref)]
        source = view.image(str(stage.get("source_image") or ""))
        if source is not None:
            refs += [ref for ref in source.chain if not view.is_ready(ref)]
    for ref in refs:
        producer = view.producer_of(ref)
        if producer is None or producer.id == image.id:
            continue
        op = producer.current_operation()
        if op is not None and op.state in _BLOCKED:
            return (
                f"waits for volume {ref}, which the {op.purpose} operation of image "
                f"{producer.id} makes; that operation is {op.state}"
                f"{': ' + op.error if op.error else ''}; check the repository for a fix"
            )
    return None


def wants_optimizing(image: Image) -> bool:
    """A ``performance`` virtual disk whose data is not (yet) one standalone raw volume."""
    return (
        image.strategy == ops.PERFORMANCE
        and image.kind == ops.VIRTUAL_DISK
        and not (len(image.chain) == 1 and image.chain[0].endswith(".raw"))
    )


def _stage(image: Image, current: Operation | None) -> str:
    op = current if current is not None else image.last_operation()
    return "0/0" if op is None else op.stage_label()


def _percent(image: Image, current: Operation | None) -> int:
    if current is None:
        return -1 if not image.operations else 100
    return current.percent
