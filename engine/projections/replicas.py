"""Replicas of a lost volume: where a snapshot's data can be had again (docs/adr/0034).

A replica of volume V, the top of snapshot S, is an image with S's id in another repository whose
recorded digest of its top equals the one recorded here for V (docs/adr/0031): same id and same
bytes. The host gathers the candidates from the repositories it connects
(:meth:`engine.host_repositories.HostRepositories.replicas`); the rules here only compare, so
the fix rules (engine/projections/check.py) stay pure and are tested without a second repository.

What the deep check found rotten (``DamageFound``, docs/adr/0033) is read here too: the byte
ranges a fix names.

Imports: :mod:`engine.aggregates`; the standard library.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.aggregates.image import DamageRecord, Image

DIGEST_SHOWN = 12  # hex digits of a digest a fix's description shows


@dataclass(frozen=True, slots=True)
class Replica:
    """An image with the id of an image here, in the repository ``repo_id`` (at ``root``)."""

    repo_id: str
    root: str
    image: Image


def _none(image_id: uuid.UUID) -> Sequence[Replica]:
    return ()


@dataclass(frozen=True, slots=True)
class ReplicaSearch:
    """Where a check (or a fix) looked for replicas: ``looked_in``, the names of those
    repositories, and ``find``, the candidates with an image's id among them (asked only for
    the owners of lost volumes). ``restricted``: ``participating_repositories`` chose them."""

    looked_in: tuple[str, ...] = ()
    find: Callable[[uuid.UUID], Sequence[Replica]] = field(default=_none)
    restricted: bool = False

    @classmethod
    def of(
        cls, candidates: Iterable[Replica], looked_in: Iterable[str] = (), restricted: bool = False
    ) -> ReplicaSearch:
        """A search over known candidates (a test's, or a replay's)."""
        by_id: dict[uuid.UUID, list[Replica]] = {}
        for r in candidates:
            by_id.setdefault(r.image.id, []).append(r)
        names = tuple(dict.fromkeys([*looked_in, *(r.repo_id for r in candidates)]))
        return cls(names, lambda i: tuple(by_id.get(i, ())), restricted)

    def where(self) -> str:
        """Where it looked, for a fix's description."""
        scope = "participating repository" if self.restricted else "connected repository"
        if not self.looked_in:
            return f"no replica: no other {scope}"
        return f"no replica in any {scope} (looked in {', '.join(self.looked_in)})"


NO_SEARCH = ReplicaSearch()


def recorded_digest(image: Image, ref: str) -> str | None:
    """The digest recorded for the image's volume ``ref`` (docs/adr/0031), if any."""
    digests: Mapping[str, object] = getattr(image, "digests", None) or {}
    record = digests.get(ref)
    # A DigestRecord (docs/adr/0031); a plain map where a state snapshot holds it as one.
    found = record.get("digest") if isinstance(record, Mapping) else getattr(record, "digest", None)
    return found if isinstance(found, str) and found else None


def replica_for(owner: Image, ref: str, search: ReplicaSearch) -> Replica | None:
    """The first candidate (in the order searched) holding exactly what the owner's volume
    ``ref`` held: made, the owner's size, and the same recorded digest. None without a
    digest recorded here: nothing proves a copy holds the same bytes."""
    wanted = recorded_digest(owner, ref)
    if wanted is None:
        return None
    for candidate in search.find(owner.id):
        if usable(candidate.image, owner) and top_digest(candidate.image) == wanted:
            return candidate
    return None


def usable(image: Image, owner: Image) -> bool:
    """Whether an image with the owner's id may be read as its replica: live, not a
    migration's replica (its data is not all there yet), the owner's kind and size, and its
    chain made (its own work may still be queued: reading a made chain is safe)."""
    return (
        not image.removed
        and image.replica_of is None
        and image.kind == owner.kind
        and image.size == owner.size
        and bool(image.chain)
        and not (set(image.chain) & image.pending_volumes())
    )


def top_digest(image: Image) -> str | None:
    return recorded_digest(image, image.chain[-1]) if image.chain else None


def rot_ranges(image: Image, ref: str) -> list[tuple[int, int]] | None:
    """The byte ranges ``[start, end)`` of the volume ``ref`` the deep check found rotten on
    this image (``DamageFound``, docs/adr/0033); None if it found none."""
    record = image.damage.get(ref)
    return None if record is None else _ranges(record)


def rotten(damaged: Mapping[str, DamageRecord]) -> dict[str, str]:
    """The volumes deep checks found damaged and no stage made again since (the view's
    ``damaged()``: on the volume's owner, live or removed), each with why."""
    found: dict[str, str] = {}
    for ref, record in damaged.items():
        ranges = _ranges(record)
        if ranges:
            found[ref] = f"volume {ref} is rotten{at_bytes(ranges)}"
        else:  # its structure, which qemu-img check found corrupt
            detail = record["detail"]
            found[ref] = f"volume {ref} is damaged" + (f": {detail}" if detail else "")
    return found


def _ranges(record: DamageRecord) -> list[tuple[int, int]]:
    return [(int(start), int(end)) for start, end in record["ranges"]]


def at_bytes(ranges: Sequence[tuple[int, int]] | None) -> str:
    if not ranges:
        return ""
    shown = ", ".join(f"{a}-{b}" for a, b in ranges[:4])
    more = f" and {len(ranges) - 4} more range(s)" if len(ranges) > 4 else ""
    return f" at bytes {shown}{more}"
