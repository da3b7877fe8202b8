"""Point-in-time replay: the repository as the log says it was after a record or at a moment.

For auditors and recovery tooling, from the log alone: the log is read with the read-only
reader (:class:`~engine.log.reader.ReadOnlyLog`, which checks every frame and the hash chain
and never writes), and folded into a detached :class:`RepositoryView` (no SQLite file), so the
statuses and fixes are those of the engine's own code. Only whole transactions are folded: a
point inside a transaction stops before it. Reading stops at the point, so damage after it is
not seen (``strata-log verify`` reads everything).

A check compares the log with the files. Here there are no files, so :func:`log_volumes` stands
in for them: every volume a completed stage made or a chain holds, less those a completed stage
deleted. What only the files can tell (leftovers of crashed stages, missing or
damaged volumes, byte counts) is not in fixes offered here.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``,
``engine.log``, ``engine.opaque``, ``engine.types``, eventsourcing; the standard library.
"""

from __future__ import annotations

import datetime
import gc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any

from eventsourcing.persistence import (
    Mapper,
)
from eventsourcing.utils import TopicError

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import deleted_by
from engine.errors import InvalidParameter, LogCorrupted
from engine.formats.repository.driver import VolumeFile
from engine.log.framing import Record, key_of
from engine.log.reader import ReadOnlyLog
from engine.log.scan import gc_paused
from engine.opaque import value_of
from engine.projections.check import find_fixes_for_volumes
from engine.projections.folded_state import by_id
from engine.projections.log_events import (
    locate,
    new_mapper,
    to_event,
    without_superseded,
)
from engine.projections.status import status_fields
from engine.projections.view import RepositoryView
from engine.types import Fix

BATCH = 20_000  # records folded at a time: copy-on-write costs once per image per batch
_CLAIMED = Image.StageClaimed.TOPIC
_HOST_ID = attrgetter("host_id")


@contextmanager
def long_lived() -> Iterator[None]:
    """The cyclic garbage collector paused while building a large state that outlives the call.

    A folded log is a million tracked objects (images, their chains, operations and sets)
    and no cycles. Paused, the collector does not walk the growing heap every few hundred
    allocations; and what survives is then handed straight to the oldest generation
    (``gc.freeze()`` then ``gc.unfreeze()``, two list splices), where a young collection would
    first walk it all, then a middle one again: 0.3 to 0.5 s of a cold rebuild. Nothing else
    of the process's collector changes: its thresholds, whether it is enabled, and the
    permanent generation are as they were (when something of the caller's is frozen, the
    survivors are left young rather than unfreeze it). Cyclic garbage made meanwhile is
    found by the next full collection instead of a young one.
    """
    with gc_paused():
        yield
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()


@dataclass(frozen=True, slots=True)
class Until:
    """A point in the log: after record ``seq``, or at ``time_ns`` (ns since the epoch).

    The log's order is the history; a time only says where to stop: before the first
    transaction stamped later than it (hosts' clocks may disagree by a little).
    """

    seq: int | None = None
    time_ns: int | None = None


@dataclass(slots=True)
class HostSeen:
    """A host as the log knows it: the records it appended."""

    host_id: str
    records: int = 0
    first_seq: int = 0
    first_time_ns: int = 0
    last_seq: int = 0
    last_time_ns: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    """A stage claimed and not finished at the point: its host may still run it, or be dead."""

    image: Image
    op_id: str
    purpose: str
    stage: str  # "X/Y"
    epoch: int
    host_id: str
    seq: int  # the StageClaimed record
    time_ns: int


@dataclass
class Replay:
    view: RepositoryView
    log_began_ns: int  # when the log's first segment was created
    time_ns: int | None = None  # of the last record folded
    ended: bool = True  # the log ended before the point (or no point was given)
    hosts: dict[str, HostSeen] = field(default_factory=dict)
    _claims: dict[bytes | str, Record] = field(default_factory=dict)

    @property
    def position(self) -> int:
        return self.view.position

    def statuses(self) -> list[dict[str, Any]]:
        """Every image the log names by id, removed ones last, as the engine would report it."""
        with long_lived():
            # Summarised in the view's order, then sorted: going through the images in id
            # order would visit memory at random, a fifth slower for a large repository.
            rows = [
                ((i.removed, by_id(i)), image_summary(i, self.view)) for i in self.view.images()
            ]
            rows.sort(key=itemgetter(0))
            return [summary for _, summary in rows]

    def fixes(self) -> list[Fix]:
        """What a check would have offered then, from the log alone (see the module's doc)."""
        with long_lived():
            return find_fixes_for_volumes(self.view, log_volumes(self.view))

    def claims(self) -> list[Claim]:
        """Stages claimed and neither completed, failed nor stopped at the point, by host."""
        found = []
        for image in self.view.images():
            op = image.current_operation()
            record = self._claims.get(key_of(image.id))
            if op is None or op.claim_host is None or record is None:
                continue
            found.append(
                Claim(
                    image, op.op_id, op.purpose, op.stage_label(), op.claim_epoch,
                    op.claim_host, record.seq, record.time_ns,
                )
            )  # fmt: skip
        return sorted(found, key=lambda c: (c.host_id, c.seq))


def image_summary(image: Image, view: RepositoryView) -> dict[str, Any]:
    image_id, status, host_id, stage, percent, last_error = status_fields(
        image, view, removed="removed"
    )
    return {
        "image_id": image_id,
        "kind": image.kind,
        "size": image.size,
        "status": status,
        "stage": stage,
        "percent_complete": percent,
        "host_id": host_id,
        "last_error": last_error,
        "removed": image.removed,
        "created": image.created_on.isoformat(),
        "modified": image.modified_on.isoformat(),
        "version": image.version,
        "chain_depth": len(image.chain),
        "chain": list(image.chain),
        "user_data": value_of(image.user_data),
    }


def replay(
    log_dir: str,
    until: Until | None = None,
    *,
    watch: uuid.UUID | None = None,
    on_watched: Callable[[Sequence[Record], RepositoryView], None] | None = None,
    skip_superseded: bool = True,
) -> Replay:
    """Fold the log up to ``until`` (the whole log without one).

    ``skip_superseded``: progress and claim records whose every effect a later record of the
    same image overwrites are not decoded (throttled progress is most of a busy log, and
    nearly every claim is followed by its completion); the state is the same either way
    (tests/replay checks it).

    With ``watch``, every transaction that holds an event of that aggregate is folded at once
    and ``on_watched(its records, the view)`` called: the state right after it (history).
    Raises InvalidParameter for a point outside the log, LogCorrupted for damage before it.
    """
    until = until or Until()
    mapper = new_mapper()
    view = RepositoryView(None, mapper=mapper)
    log = ReadOnlyLog(log_dir)
    result = Replay(view, log_began_ns=0)
    watched = None if watch is None else key_of(watch)
    stop_seq, stop_ns = until.seq, until.time_ns
    batch: list[Record] = []
    start = 0  # where the transaction being read begins in the batch
    last: Record | None = None  # the last record of the last transaction taken
    chunks = log.batches()

    def fold() -> None:
        _note_hosts_and_claims(result, batch)
        _fold(view, mapper, log_dir, batch, skip_superseded)

    def past(record: Record) -> bool:
        return (stop_seq is not None and record.seq > stop_seq) or (
            stop_ns is not None and record.time_ns > stop_ns
        )

    try:
        with long_lived():
            for chunk in chunks:
                # A chunk ends with a whole transaction. Taken whole when nothing in it needs a
                # look of its own (a point inside it, or a watched image): most of a replay.
                if on_watched is None and not past(chunk[-1]):
                    batch += chunk
                    last = chunk[-1]
                    if len(batch) >= BATCH:
                        fold()
                        batch = []
                    start = len(batch)
                    continue
                for record in chunk:
                    batch.append(record)
                    if not record.txn_last:
                        continue
                    if past(record):
                        del batch[start:]
                        result.ended = False
                        break
                    last = record
                    if on_watched is not None and any(
                        r.originator_key == watched for r in batch[start:]
                    ):
                        fold()
                        on_watched(batch[start:], view)
                        batch = []
                    elif len(batch) >= BATCH:
                        fold()
                        batch = []
                    start = len(batch)
                if not result.ended:
                    break
            fold()
    finally:
        chunks.close()
    result.time_ns = None if last is None else last.time_ns
    result.log_began_ns = min(
        [log.headers[1].created_ns, *(h.first_time_ns for h in result.hosts.values())]
    )
    _check_point(until, result)
    return result


def _note_hosts_and_claims(result: Replay, batch: Sequence[Record]) -> None:
    """Count each host's records in ``batch``, and keep each image's last claim.

    Per batch rather than per record: the counting and the filtering run in C.
    """
    hosts = result.hosts
    counts = Counter(map(_HOST_ID, batch))
    for host_id, count in counts.items():
        seen = hosts.get(host_id)
        if seen is None:
            first = next(r for r in batch if r.host_id == host_id)
            seen = hosts[host_id] = HostSeen(host_id, 0, first.seq, first.time_ns)
        seen.records += count
    unseen = set(counts)  # hosts whose last record in the batch is still to find
    for r in reversed(batch):
        if r.host_id in unseen:
            unseen.discard(r.host_id)
            seen = hosts[r.host_id]
            seen.last_seq, seen.last_time_ns = r.seq, r.time_ns
            if not unseen:
                break
    result._claims.update({r.originator_key: r for r in batch if r.topic == _CLAIMED})


def _check_point(until: Until, result: Replay) -> None:
    if until.seq is not None and result.ended and until.seq > result.position:
        raise InvalidParameter(
            f"sequence {until.seq} is past the end of the log, which ends at {result.position}",
            name="until",
        )
    if until.time_ns is not None and until.time_ns < result.log_began_ns:
        raise InvalidParameter(
            f"{_iso(until.time_ns)} is before the log began ({_iso(result.log_began_ns)})",
            name="until",
        )


def _iso(time_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _fold(
    view: RepositoryView, mapper: Mapper[Any], log_dir: str, batch: list[Record], skip: bool
) -> None:
    try:
        view.fold(without_superseded(batch) if skip else batch)
    except (TopicError, ValueError) as e:
        # Which record? Decode them again one by one; a record that decodes is not the cause.
        for record in batch:
            try:
                to_event(mapper, record)
            except (TopicError, ValueError) as bad:
                segment, offset = locate(log_dir, record.seq)
                raise LogCorrupted(
                    f"record {record.seq} ({record.topic}) does not decode as an event this "
                    f"Strata knows: {bad}",
                    segment=segment,
                    offset=offset,
                ) from e
        raise


def log_volume_files(view: RepositoryView) -> list[VolumeFile]:
    """The volume files the log says exist, by :func:`log_volumes`. No sizes."""
    files = []
    for ref in log_volumes(view):
        volume_id, fmt = ops.split_ref(ref)
        files.append(VolumeFile(volume_id, fmt, f"volumes/{ref}", 0, 0, False))
    return files


def log_volumes(view: RepositoryView) -> list[str]:
    """The volumes the log says have a file: what completed stages made and chains hold, less
    what stages still to run will make and what completed stages deleted; sorted."""
    made: set[str] = set()
    pending: set[str] = set()
    deleted: set[str] = set()
    for image in view.images():
        made.update(image.chain)
        for op in image.operations:
            for number, stage in enumerate(op.stages):
                done = number < op.done
                volume = ops.produced_by(stage)
                if volume is not None:
                    (made if done else pending).add(volume)
                if done:
                    deleted.update(deleted_by(stage) or ())
    return sorted(made - pending - deleted)
