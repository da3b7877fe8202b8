"""A fix's opaque data: making it for a check, and decoding it into a checked plan to start.

``Fix.data`` is base64 msgpack ``{"v", "type", "target", "new_carrier", "images", "salt", "op",
"release"}``: the image that carries the work, the versions the check saw, and either the
operation to queue or the id of a blocked operation to release. A new operation's id is a hash
of its type, target, stages and ``salt`` (the target's operation count at check time), so the
same fix from two hosts or two calls queues one operation (the second finds it queued and does
nothing), while a problem that comes back after its fix ran gets a new one. Data that no check
made (the id does not match the operation) is refused as an invalid parameter.

A mend from a replica also holds ``{"replica": {"repo", "root", "digest"}}``: starting it looks
for that replica again, and refuses the fix if it is gone or holds other bytes (docs/adr/0034).

A foreign file's ``mend`` holds ``{"foreign": {"path", "what"}}`` and neither an operation nor a
release: it reports, and starting it is refused with :class:`ForeignFile` (docs/adr/0016).

Starting a decoded plan is a command: engine/service/fix_handlers.py.

Imports: :mod:`engine.aggregates`, :mod:`engine.errors`, :mod:`engine.types`, the view's volume
index (:mod:`engine.projections.volume_needs`), the replicas' rules
(:mod:`engine.projections.replicas`) and the command it decodes to
(:class:`engine.service.fix_handlers.FixPlan`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgpack

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation, Purpose
from engine.aggregates.stage_kinds import DeleteStage, Stage
from engine.aggregates.work_rules import BLOCKED, release_type
from engine.errors import ForeignFile, InvalidParameter, StaleFix
from engine.projections.replicas import (
    NO_SEARCH,
    Replica,
    ReplicaSearch,
    recorded_digest,
    top_digest,
    usable,
)
from engine.projections.volume_needs import VolumeIndex, can_optimize
from engine.service.fix_handlers import FixPlan
from engine.types import Fix

if TYPE_CHECKING:
    from engine.projections.view import RepositoryView

DATA_VERSION = 1
_CARRIERS = uuid.UUID("5d1e8a0c-2f4b-4e58-9a55-0c1ea4c0ffee")  # namespace of new carriers' ids
_FOREIGN = uuid.UUID("0f0e1a2b-6c3d-4e5f-8a9b-1c2d3e4f5a6b")  # namespace of foreign files' fixes


# --- making ----------------------------------------------------------------------------------


def digest(*parts: object) -> str:
    packed = msgpack.packb([str(p) if isinstance(p, uuid.UUID) else p for p in parts])
    return hashlib.blake2b(packed, digest_size=16).hexdigest()


def _op_id(kind: str, target: str, salt: int, stages: Sequence[Stage]) -> str:
    return digest("op", kind, target, salt, stages)


def make_fix(
    kind: Purpose,
    target: Image,
    touched: list[Image],
    description: str,
    *,
    stages: Sequence[Stage] | None = None,
    release: str | None = None,
    remove: str | None = None,
    replica: Replica | None = None,
) -> Fix:
    """``remove``: instead of queuing work, remove the image, with that reason (a ``mend`` of
    an image whose data is lost). ``replica``: the copy the work reads (a mend from a replica,
    docs/adr/0034), looked for again when the fix is started."""
    salt = len(target.operations)
    target_id = target.id_text
    op = None
    if stages is not None:
        op = ops.plan(_op_id(kind, target_id, salt, stages), kind, *stages)
    touched_ids = [i.id_text for i in touched]
    data = {
        "v": DATA_VERSION,
        "type": kind,
        "target": target_id,
        "new_carrier": False,
        "images": {i: image.version for i, image in zip(touched_ids, touched, strict=True)},
        "salt": salt,
        "op": op,
        "release": release,
    }
    if remove is not None:
        data["remove"] = remove
    if replica is not None:
        data["replica"] = {
            "repo": replica.repo_id,
            "root": replica.root,
            "digest": top_digest(replica.image) or "",
        }
    ids = tuple(dict.fromkeys(touched_ids))
    return Fix(type=str(kind), image_ids=ids, description=description, data=_encode(data))


def new_carrier_fix(description: str, stages: Sequence[Stage]) -> Fix:
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
    return Fix(type=str(ops.CLEAN), image_ids=(), description=description, data=_encode(data))


def foreign_file_fix(path: str, what: str, touched: list[Image], description: str) -> Fix:
    """A ``mend`` that reports the foreign file ``path``; starting it is refused."""
    touched_ids = [i.id_text for i in touched]
    data = {
        "v": DATA_VERSION,
        "type": ops.MEND,
        "target": str(uuid.uuid5(_FOREIGN, path)),
        "new_carrier": False,
        "images": {i: image.version for i, image in zip(touched_ids, touched, strict=True)},
        "salt": 0,
        "op": None,
        "release": None,
        "foreign": {"path": path, "what": what},
    }
    ids = tuple(dict.fromkeys(touched_ids))
    return Fix(type=str(ops.MEND), image_ids=ids, description=description, data=_encode(data))


def _encode(data: dict[str, object]) -> str:
    return base64.b64encode(msgpack.packb(data, use_bin_type=True)).decode("ascii")


# --- starting --------------------------------------------------------------------------------


def decode_fix(
    view: RepositoryView,
    fix: Fix,
    elsewhere: Collection[str] = (),
    writers: Mapping[str, Operation] | None = None,
    replicas: ReplicaSearch = NO_SEARCH,
) -> FixPlan:
    """Check a fix against the current state. InvalidParameter for data that no check made,
    StaleFix when it no longer applies; ``already_queued`` when its work is already queued.
    ``elsewhere``: volumes here that work in other repositories reads; ``writers``: their
    operations that write temporary files here, by id; ``replicas``: where a mend from a
    replica may look for it now (docs/adr/0034)."""
    data = _decode(fix)
    if data.get("foreign") is not None:
        # Only a person can put it right: whatever Strata did would go through the link.
        raise ForeignFile(path=data["foreign"]["path"], what=data["foreign"]["what"])
    plan = FixPlan(
        type=data["type"],
        target=uuid.UUID(data["target"]),
        op_id=data["release"] or (data["op"] or {}).get("op_id") or "",
        operation=data["op"],
        new_carrier=data["new_carrier"],
        already_queued=False,
        images=data["images"],
        remove=data.get("remove"),
    )
    image = view.image(plan.target)
    if plan.new_carrier:
        if image is not None:
            return _queued(plan)  # the carrier exists: this very fix was started
        _check_clean(VolumeIndex(view.images(), elsewhere, writers), None, data["op"]["stages"])
        return plan
    if image is None:
        raise StaleFix(f"image {plan.target} is not in this repository")
    if data["release"] is not None:
        needed = VolumeIndex(view.images(), elsewhere).needed if image.removed else ()
        return _check_release(view, image, plan, needed)
    if plan.remove is not None:
        if image.removed:
            return _queued(plan)
        if image.version != plan.images.get(image.id_text):
            raise StaleFix(f"image {image.id} changed since the check ({_moved(view, plan)})")
        return plan
    if image.operation(plan.op_id) is not None:
        return _queued(plan)
    stages = data["op"]["stages"]
    index = VolumeIndex(view.images(), elsewhere, writers)
    if plan.type == ops.OPTIMIZE:
        if not can_optimize(image, ()) or stages[0].get("source_image") != image.id_text:
            raise StaleFix(f"virtual disk {image.id} is busy, in use or optimized already")
    elif plan.type == ops.MEND:
        if image.removed or image.current_operation() is not None:
            raise StaleFix(f"image {image.id} was removed or has work queued since the check")
        if data.get("replica") is not None:
            _check_replica(image, data["replica"], replicas)
    elif plan.type == ops.MERGE:
        why = index.stale_merge(image, stages)
        if why is not None:
            raise StaleFix(f"{why} ({_moved(view, plan)})")
    else:
        _check_clean(index, image, stages)
    return plan


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


def _check_release(
    view: RepositoryView, image: Image, plan: FixPlan, needed: Collection[str]
) -> FixPlan:
    op = image.operation(plan.op_id)
    if op is None:
        raise InvalidParameter(f"image {image.id} has no operation {plan.op_id}", name="fix")
    if op.state not in BLOCKED:
        return _queued(plan)  # released already, by this host or another
    if release_type(image, op, needed) != plan.type:
        why = "it was removed" if image.removed else "its work changed"
        raise StaleFix(f"{plan.type} of image {image.id}: {why} ({_moved(view, plan)})")
    return plan


def _check_replica(image: Image, wanted: dict[str, str], replicas: ReplicaSearch) -> None:
    """StaleFix unless the replica the check chose is still there, the same bytes, and
    among the repositories this fix may look in."""
    where = f"repository {wanted['repo']} ({wanted['root']})"
    if not any(r.root == wanted["root"] for r in replicas.find(image.id)):
        if wanted["repo"] not in replicas.looked_in:
            raise StaleFix(f"the replica of image {image.id} in {where} is not looked in now")
        raise StaleFix(f"the replica of image {image.id} in {where} is gone")
    for candidate in replicas.find(image.id):
        if candidate.root != wanted["root"]:
            continue
        if usable(candidate.image, image) and top_digest(candidate.image) == wanted["digest"]:
            if recorded_digest(image, image.chain[-1]) == wanted["digest"]:
                return
            raise StaleFix(f"the digest recorded for image {image.id} changed since the check")
    raise StaleFix(f"the replica of image {image.id} in {where} changed since the check")


def _check_clean(index: VolumeIndex, carrier: Image | None, stages: list[DeleteStage]) -> None:
    needed = [ref for ref in stages[0]["volumes"] if index.is_needed(ref)]
    if needed:
        raise StaleFix(f"volume(s) {', '.join(needed)} are needed again or already queued")
    for _, tag in stages[0].get("temporaries") or ():
        if not index.is_leftover(tag):
            raise StaleFix(f"the temporary file of attempt {tag} is in use again")
    if carrier is None:
        return
    op = carrier.current_operation()
    if op is not None and op.state in BLOCKED:
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
    op, release, remove = data["op"], data["release"], data.get("remove")
    foreign = data.get("foreign")
    if foreign is not None:
        if op is not None or release is not None or fix.type != ops.MEND:
            raise ValueError("a foreign file's report with work to do")
        if not isinstance(foreign.get("path"), str) or not isinstance(foreign.get("what"), str):
            raise ValueError("bad foreign file")
        return
    replica = data.get("replica")
    if replica is not None and (
        fix.type != ops.MEND
        or op is None
        or not isinstance(replica, dict)
        or not all(isinstance(replica.get(k), str) for k in ("repo", "root", "digest"))
    ):
        raise ValueError("bad replica")
    if remove is not None:
        if fix.type != ops.MEND or op is not None or release is not None:
            raise ValueError("a removal is a mend, with no operation and no release")
        if not isinstance(remove, str) or data["new_carrier"]:
            raise ValueError("bad removal")
        return
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
        temporaries = stages[0].get("temporaries") or []
        if fix.type == ops.CLEAN and not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
            for t in temporaries
        ):
            raise ValueError("bad temporaries")
    elif data["new_carrier"]:
        raise ValueError("a new carrier without an operation")
