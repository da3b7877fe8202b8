"""The mends of a live snapshot's lost or rotten volume (docs/adr/0034), for the fix rules of
engine/projections/check.py: one fix on the snapshot, naming every live image that reads the
volume. From a replica in another repository when one holds the same bytes (a ``copy`` of its
whole content for a standalone volume, a ``diff`` from the volume's backing for an overlay, so
the chain keeps its shape); else, said so, two choices: remove the snapshot, or accept the loss
and recreate the volume empty, its digest recorded anew.

Imports: :mod:`engine.aggregates`, :mod:`engine.types` and the projections beside it (the fixes'
data, the replicas' rules, the volume index).
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CopyStage, CreateStage, Stage, StageKind
from engine.projections.fix_tokens import make_fix
from engine.projections.replicas import (
    DIGEST_SHOWN,
    Replica,
    ReplicaSearch,
    at_bytes,
    replica_for,
    rot_ranges,
    top_digest,
)
from engine.projections.volume_needs import VolumeIndex
from engine.types import Fix


def snapshot_mends(
    index: VolumeIndex,
    owner: Image,
    ref: str,
    state: str,
    clear: list[Stage],
    replicas: ReplicaSearch,
) -> Iterable[Fix]:
    """The mends of a snapshot's lost top ``ref``, on the snapshot, naming every live image
    that reads it: from a replica (the same bytes, docs/adr/0034), else the two choices."""
    readers = index.live_users.get(ref, ())
    users = [
        owner,
        *(
            u
            for u in readers
            if u is not owner and not (u.replica_of is not None and not u.removed)
        ),
    ]
    ranges = rot_ranges(owner, ref)
    if ranges:  # none: qemu-img check found its structure corrupt, "damaged"
        state = "rotten"
    head = f"mend {owner.kind} {owner.id}: volume {ref} is {state}"
    if len(users) > 1:
        above = ", ".join(u.id_text for u in users[1:])
        head_users = f" (read by {above} too)"
    else:
        head_users = ""
    replica = replica_for(owner, ref, replicas)
    if replica is not None:
        yield make_fix(
            ops.MEND,
            owner,
            users,
            f"{head}; copy it again from its replica in repository {replica.repo_id} (digest "
            f"{(top_digest(replica.image) or '')[:DIGEST_SHOWN]}, no data is lost){head_users}",
            stages=[*clear, _remake(owner, ref, replica)],
            replica=replica,
        )
        return
    head = f"{head}{at_bytes(ranges)}; {replicas.where()}"
    yield make_fix(
        ops.MEND,
        owner,
        users,
        f"{head}: remove the image (data lost){head_users}",
        remove=f"data lost: volume {ref} is {state}, {replicas.where()}",
    )
    yield make_fix(
        ops.MEND,
        owner,
        users,
        f"{head}: accept the loss: recreate the volume empty (zeroes where it held data)"
        f"{head_users}",
        stages=[*clear, *_recreate_empty(owner, ref)],
    )


def _remake(owner: Image, ref: str, replica: Replica) -> Stage:
    """The stage that makes ``ref`` again from the replica: a copy of its whole content for
    a standalone volume, the difference from the volume's backing for an overlay."""
    if len(owner.chain) > 1:
        return {
            "do": "diff",
            "source_image": owner.id_text,
            "source_root": replica.root,
            "base": owner.chain[-2],
            "volume": ref,
        }
    stage: CopyStage = {
        "do": "copy",
        "source_image": owner.id_text,
        "source_root": replica.root,
        "volume": ref,
    }
    if ref.endswith(".raw"):
        stage["preallocate"] = True
    return stage


def _recreate_empty(owner: Image, ref: str) -> list[Stage]:
    """The volume made again empty: over its backing, or standalone of the image's size;
    then its digest recorded anew where that stage kind exists (docs/adr/0031), or the next
    deep check would find the accepted loss rotten."""
    create: CreateStage = {"do": "create", "volume": ref, "size": owner.size}
    if len(owner.chain) > 1:
        create["backing"] = owner.chain[-2]
    stages: list[Stage] = [create]
    digest_stage = _digest_stage(ref, owner.chain[-2] if len(owner.chain) > 1 else None)
    if digest_stage is not None:
        stages.append(digest_stage)
    return stages


def _digest_stage(ref: str, backing: str | None) -> Stage | None:
    """A stage that records the volume's digest, once the ``digest`` kind exists."""
    if "digest" not in {str(k) for k in StageKind}:
        return None
    stage: dict[str, str] = {"do": "digest", "volume": ref}
    if backing is not None:
        stage["backing"] = backing  # its digest, if recorded, stands for what ref leaves to it
    return stage  # type: ignore[return-value]
