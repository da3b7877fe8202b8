"""What check_storage_repository offers and what fix_storage_repository starts (seed 000's fixes).

Pure rules over the view's images and the repository's files:

``mend``      release an image's failed, stopped or held operation (its own type when it is an
              ``optimize``, ``clean`` or ``merge``: those leave the data usable);
``optimize``  a ``performance`` virtual disk that is not one raw volume: copy it into one;
``merge``     a volume that live chains go through but that is no live image's own (the top of
              a removed snapshot): rebase each child onto its parent, then chains drop it;
``clean``     files that no live chain, unfinished stage or queued operation needs.

Every fix is an operation queued on a *carrier* image. ``optimize`` and ``mend`` run on their
image. A ``merge`` runs on the first (by id) live image whose chain goes through the volume: it
rewrites that image's volumes, so it belongs in its queue, ordered with its other work, visible
in its status and awaited by ``wait_for_image``. A ``clean`` runs on the removed image whose
chain holds the files; files of no image, or of a removed image whose queue is blocked, go to a
new carrier: an image requested and removed in one transaction, seen by nobody but executors.

``Fix.data`` is base64 msgpack ``{"v", "type", "target", "new_carrier", "images", "salt", "op",
"release"}``. A new operation's id is a hash of its type, target, content and ``salt`` (the
target's operation count at check time), so the same fix from two hosts or two calls queues one
operation, and a problem that comes back after its fix ran gets a new one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import msgpack

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.errors import ConcurrencyConflict, InvalidParameter, StaleFix
from engine.formats.driver import VolumeFile
from engine.projections.fix_index import RUN_ON_REMOVED, VolumeIndex, merge_chain_changes
from engine.projections.status import wants_optimizing
from engine.types import Fix

if TYPE_CHECKING:
    from engine.projections.view import RepositoryView
    from engine.service import ImageService

DATA_VERSION = 1
_CARRIERS = uuid.UUID("5d1e8a0c-2f4b-4e58-9a55-0c1ea4c0ffee")  # namespace of new carriers
_ORDER = {ops.MEND: 0, ops.OPTIMIZE: 1, ops.MERGE: 2, ops.CLEAN: 3}
_BLOCKED = (ops.FAILED, ops.STOPPED, ops.HELD)


@dataclass(frozen=True, slots=True)
class Problems:
    lost: frozenset[str]  # volumes of live chains that should exist and do not (or are damaged)
    fixes: list[Fix]


@dataclass(frozen=True, slots=True)
class FixPlan:
    """A decoded, checked fix: queue ``operation`` on ``target`` (or release ``op_id``)."""

    type: str
    target: uuid.UUID
    op_id: str
    operation: dict[str, Any] | None  # None: release the held, failed or stopped op_id
    new_carrier: bool  # the target is to be created (requested and removed) with the operation
    already_queued: bool  # nothing to do: this very work is queued, running or done
    images: dict[str, int]  # the versions the check saw


# --- check ----------------------------------------------------------------------------------


def find_problems(
    view: RepositoryView, files: Iterable[VolumeFile], *, damaged: Collection[str] = ()
) -> Problems:
    """Lost volumes and the fixes worth offering. ``damaged``: volumes a deeper check found
    corrupt; they count as lost."""
    index = VolumeIndex(view.images())
    on_disk: dict[str, list[VolumeFile]] = {}
    for f in files:
        on_disk.setdefault(ops.volume_ref(f.volume_id, f.fmt), []).append(f)
    published = {ref for ref, fs in on_disk.items() if any(not f.is_temporary for f in fs)}
    lost = frozenset(
        ref
        for ref in index.live_users
        if ref not in index.pending and (ref not in published or ref in damaged)
    )
    fixes = [*_releases(index), *_optimizations(index, lost), *_merges(index, lost)]
    fixes += _cleans(index, on_disk)
    fixes.sort(key=lambda f: (_ORDER[f.type], f.image_ids, f.data))
    return Problems(lost, fixes)


def find_fixes(
    view: RepositoryView, files: Iterable[VolumeFile], *, damaged: Collection[str] = ()
) -> list[Fix]:
    return find_problems(view, files, damaged=damaged).fixes


def release_type(image: Image, op: ops.Operation) -> str | None:
    """The fix that releases a blocked operation, or None when nothing may release it."""
    if op.purpose in (ops.OPTIMIZE, ops.CLEAN, ops.MERGE):
        return op.purpose if not image.removed or op.purpose in RUN_ON_REMOVED else None
    return None if image.removed else ops.MEND


def _releases(index: VolumeIndex) -> Iterable[Fix]:
    for image in index.images:
        op = image.current_operation()
        if op is None or op.state not in _BLOCKED:
            continue
        kind = release_type(image, op)
        if kind is None:
            continue
        why = op.error or ("held for a fix (auto_fix=False)" if op.state == ops.HELD else "")
        yield _fix(
            kind,
            image,
            [image],
            f"{kind} {image.kind} {image.id}: resume its {op.purpose} operation ({why})",
            release=op.op_id,
        )


def _optimizations(index: VolumeIndex, lost: Collection[str]) -> Iterable[Fix]:
    for image in index.images:
        if _can_optimize(image, lost):
            flat = ops.volume_ref(_digest("volume", image.id, len(image.operations)), "raw")
            stage = {
                "do": "copy",
                "source_image": str(image.id),
                "volume": flat,
                "preallocate": True,
                "set_chain": [flat],
            }
            depth = len(image.chain)
            yield _fix(
                ops.OPTIMIZE,
                image,
                [image],
                f"optimize virtual disk {image.id}: flatten its {depth} volume(s) into one "
                "preallocated raw volume (strategy performance)",
                stages=[stage],
            )


def _can_optimize(image: Image, lost: Collection[str]) -> bool:
    return (
        not image.removed
        and wants_optimizing(image)
        and image.current_operation() is None
        and not image.prepared_on
        and not any(ref in lost for ref in image.chain)
    )


def _merges(index: VolumeIndex, lost: Collection[str]) -> Iterable[Fix]:
    busy = set(index.merging_families)
    candidates = sorted(index.mergeable(), key=lambda m: (m.depth, m.volume))
    for merge in candidates:
        if merge.family in busy or index.merge_blocker(merge, lost) is not None:
            continue
        busy.add(merge.family)  # one merge per family of chains at a time
        carrier = merge.users[0]
        yield _fix(
            ops.MERGE,
            carrier,
            [*merge.users, *merge.owners],
            f"merge volume {merge.volume} of removed image(s) "
            f"{', '.join(str(o.id) for o in merge.owners) or '(none)'} into "
            f"{len(merge.children)} child volume(s), shortening {len(merge.users)} chain(s)",
            stages=index.merge_stages(merge, carrier),
        )


def _cleans(index: VolumeIndex, on_disk: dict[str, list[VolumeFile]]) -> list[Fix]:
    by_carrier: dict[uuid.UUID | None, list[str]] = {}
    for ref in sorted(on_disk):
        if index.is_needed(ref):
            continue
        owner = index.clean_owner(ref)
        by_carrier.setdefault(None if owner is None else owner.id, []).append(ref)
    fixes = []
    for key, refs in by_carrier.items():
        size = sum(f.allocated for ref in refs for f in on_disk[ref])
        stages = [{"do": "delete", "volumes": refs}]
        if key is None:
            what = f"{len(refs)} volume(s) no image needs (leftovers and orphans)"
            fixes.append(_new_carrier_fix(f"clean {what}, {size} bytes", stages))
        else:
            owner = index.by_id[key]
            what = f"{len(refs)} volume(s) of removed image {key}, {size} bytes"
            fixes.append(_fix(ops.CLEAN, owner, [owner], f"clean {what}", stages=stages))
    return fixes


# --- fix data ---------------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    packed = msgpack.packb([str(p) if isinstance(p, uuid.UUID) else p for p in parts])
    return hashlib.blake2b(packed, digest_size=16).hexdigest()


def _op_id(kind: str, target: str, salt: int, stages: list[dict[str, Any]]) -> str:
    return _digest("op", kind, target, salt, stages)


def _fix(
    kind: str,
    target: Image,
    touched: list[Image],
    description: str,
    *,
    stages: list[dict[str, Any]] | None = None,
    release: str | None = None,
) -> Fix:
    salt = len(target.operations)
    op = None
    if stages is not None:
        op = ops.plan(_op_id(kind, str(target.id), salt, stages), kind, *stages)
    data = {
        "v": DATA_VERSION,
        "type": kind,
        "target": str(target.id),
        "new_carrier": False,
        "images": {str(i.id): i.version for i in touched},
        "salt": salt,
        "op": op,
        "release": release,
    }
    ids = tuple(dict.fromkeys(str(i.id) for i in touched))
    return Fix(type=kind, image_ids=ids, description=description, data=_encode(data))


def _new_carrier_fix(description: str, stages: list[dict[str, Any]]) -> Fix:
    op_id = _op_id(ops.CLEAN, "new", 0, stages)
    data = {
        "v": DATA_VERSION,
        "type": ops.CLEAN,
        "target": str(uuid.uuid5(_CARRIERS, op_id)),
        "new_carrier": True,
        "images": {},
        "salt": 0,
        "op": ops.plan(op_id, ops.CLEAN, *stages),
        "release": None,
    }
    return Fix(type=ops.CLEAN, image_ids=(), description=description, data=_encode(data))


def _encode(data: dict[str, Any]) -> str:
    return base64.b64encode(msgpack.packb(data, use_bin_type=True)).decode("ascii")


# --- fix --------------------------------------------------------------------------------------


def decode_fix(view: RepositoryView, fix: Fix) -> FixPlan:
    """Check a fix against the current state. InvalidParameter for data that no check made,
    StaleFix when it no longer applies; ``already_queued`` when its work is already queued."""
    data = _decode(fix)
    plan = FixPlan(
        type=data["type"],
        target=uuid.UUID(data["target"]),
        op_id=data["release"] or data["op"]["op_id"],
        operation=data["op"],
        new_carrier=data["new_carrier"],
        already_queued=False,
        images=data["images"],
    )
    image = view.image(plan.target)
    if plan.new_carrier:
        if image is not None:
            return _queued(plan)  # the carrier exists: this very fix was started
        _check_clean(VolumeIndex(view.images()), None, data["op"]["stages"])
        return plan
    if image is None:
        raise StaleFix(f"image {plan.target} is not in this repository")
    if data["release"] is not None:
        return _check_release(view, image, plan)
    if image.operation(plan.op_id) is not None:
        return _queued(plan)
    stages = data["op"]["stages"]
    index = VolumeIndex(view.images())
    if plan.type == ops.OPTIMIZE:
        if not _can_optimize(image, ()) or stages[0].get("source_image") != str(image.id):
            raise StaleFix(f"virtual disk {image.id} is busy, in use or optimized already")
    elif plan.type == ops.MERGE:
        why = index.stale_merge(image, stages)
        if why is not None:
            raise StaleFix(f"{why} ({_moved(view, plan)})")
    else:
        _check_clean(index, image, stages)
    return plan


def apply_fix(view: RepositoryView, service: ImageService, fix: Fix) -> bool:
    """Start a fix: True if this call queued (or released) the work, False if it already was."""
    plan = decode_fix(view, fix)
    if plan.already_queued:
        return False
    if plan.new_carrier:
        now = service.now()
        carrier = Image.request(
            image_id=plan.target,
            kind=ops.SNAPSHOT,
            size=0,
            chain=[],
            user_data=None,
            strategy=ops.SPACE,
            auto_fix=True,
            origin={"how": "clean carrier"},
            operations=[plan.operation] if plan.operation is not None else [],
            host_id=service.host_id,
            now=now,
        )
        carrier.remove(host_id=service.host_id, now=now)
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


def _queued(plan: FixPlan) -> FixPlan:
    return replace(plan, already_queued=True)


def _moved(view: RepositoryView, plan: FixPlan) -> str:
    moved = []
    for image_id, seen in plan.images.items():
        image = view.image(image_id)
        now = "gone" if image is None else image.version
        if now != seen:
            moved.append(f"image {image_id} version {seen} -> {now}")
    return "; ".join(moved) or "no image version moved"


def _check_release(view: RepositoryView, image: Image, plan: FixPlan) -> FixPlan:
    op = image.operation(plan.op_id)
    if op is None:
        raise InvalidParameter(f"image {image.id} has no operation {plan.op_id}", name="fix")
    if op.state not in _BLOCKED:
        return _queued(plan)  # released already, by this host or another
    if release_type(image, op) != plan.type:
        why = "it was removed" if image.removed else "its work changed"
        raise StaleFix(f"{plan.type} of image {image.id}: {why} ({_moved(view, plan)})")
    return plan


def _check_clean(index: VolumeIndex, carrier: Image | None, stages: list[dict[str, Any]]) -> None:
    needed = [ref for ref in stages[0]["volumes"] if index.is_needed(ref)]
    if needed:
        raise StaleFix(f"volume(s) {', '.join(needed)} are needed again or already queued")
    if carrier is None:
        return
    op = carrier.current_operation()
    if op is not None and op.state in _BLOCKED:
        raise StaleFix(f"image {carrier.id} has work waiting for a fix first; check again")


def _decode(fix: Fix) -> dict[str, Any]:
    if not isinstance(fix, Fix) or not isinstance(fix.data, str):
        raise InvalidParameter("a Fix as check_storage_repository returned it", name="fix")
    try:
        data = msgpack.unpackb(base64.b64decode(fix.data, validate=True), raw=False)
        _check_shape(data, fix)
    except (ValueError, TypeError, KeyError, binascii.Error, msgpack.UnpackException) as e:
        raise InvalidParameter(f"its data was not made by a check ({e})", name="fix") from None
    return data  # type: ignore[no-any-return]


def _check_shape(data: Any, fix: Fix) -> None:
    if not isinstance(data, dict) or data.get("v") != DATA_VERSION:
        raise ValueError("unknown layout")
    if data["type"] != fix.type or fix.type not in ops.FIX_TYPES:
        raise ValueError(f"type {data['type']!r} is not the fix's {fix.type!r}")
    uuid.UUID(data["target"])
    if not isinstance(data["images"], dict) or not isinstance(data["salt"], int):
        raise ValueError("bad images or salt")
    op, release = data["op"], data["release"]
    if (op is None) == (release is None):
        raise ValueError("neither or both of an operation and a release")
    if release is not None and not isinstance(release, str):
        raise ValueError("bad release")
    if op is not None:
        target = "new" if data["new_carrier"] else data["target"]
        stages = op["stages"]
        if (
            op["purpose"] != fix.type
            or _op_id(fix.type, target, data["salt"], stages) != op["op_id"]
        ):
            raise ValueError("the operation does not match its id")
        if fix.type == ops.CLEAN and not all(isinstance(r, str) for r in stages[0]["volumes"]):
            raise ValueError("bad volumes")
    elif data["new_carrier"]:
        raise ValueError("a new carrier without an operation")


__all__ = [
    "FixPlan",
    "Problems",
    "apply_fix",
    "decode_fix",
    "find_fixes",
    "find_problems",
    "merge_chain_changes",
    "release_type",
]
