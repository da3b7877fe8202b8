"""The read model of one repository: every image's state, folded from the log and kept current.

Images are folded with the aggregate's own ``Image.apply``, so the view can never disagree with
what a command would see. :meth:`RepositoryView.catch_up` reads only the records after its
position; the facade calls it after each of its own saves (read-your-writes, microseconds when
little is new), executors and a follower thread call it when the log grows. It is thread-safe:
state changes under one lock, and images are copy-on-write, so an ``Image`` a query returned is
never changed afterwards and may be read without the lock (treat it as read-only).

With ``db_path`` the view keeps the SQLite read model (engine/projections/read_model.py) in step
and starts from it: a restart reads only what was appended since.

Imports: its own package, ``engine.aggregates``, ``engine.application``, ``engine.errors``,
``engine.log``, eventsourcing; the standard library.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.persistence import Mapper

from engine.aggregates.image import DamageRecord, Image
from engine.aggregates.repository import Repository
from engine.application import StrataLogApplication
from engine.errors import InvalidParameter, LogCorrupted
from engine.log import OperationLog
from engine.log.framing import Record
from engine.projections.folded_state import clone, image_key
from engine.projections.log_events import record_decoder, records_decoder
from engine.projections.read_model import Checkpoint, ReadModel, image_row
from engine.projections.status import image_status

DEFAULT_BATCH = 500
# Records decoded at a time before their events are applied: a few hundred KiB of events.
_DECODE_CHUNK = 128
_START = Checkpoint(0, b"", 0)
# The events that mean a host worked on the image (claimed, ran, finished or failed a stage).
_WORK = (
    Image.StageClaimed,
    Image.StageProgressed,
    Image.StageCheckpointed,
    Image.StageCompleted,
    Image.StageFailed,
)
_is_work: dict[type, bool] = {}  # isinstance(event, _WORK) by event class, asked once per class


@dataclass(frozen=True, slots=True)
class RepositoryInfo:
    """What ``Repository.Created`` recorded."""

    format_name: str
    format_version: str
    created_by: str
    created_on: str  # ISO 8601

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_name": self.format_name,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "created_on": self.created_on,
        }


class RepositoryView:
    def __init__(
        self,
        app: StrataLogApplication | None,
        *,
        db_path: str | None = None,
        batch_size: int = DEFAULT_BATCH,
        mapper: Mapper[Any] | None = None,
    ) -> None:
        """``app=None`` (with a ``mapper``) makes a detached view: no log and no read model of
        its own, fed only by :meth:`fold` with records read elsewhere (point-in-time replay
        over a read-only log, engine/projections/point_in_time.py)."""
        if app is not None:
            self._log: OperationLog | None = app.operation_log
            self._mapper: Mapper[Any] = mapper or app.mapper
        elif mapper is not None and db_path is None:
            self._log, self._mapper = None, mapper
        else:
            raise InvalidParameter("a detached view needs a mapper and has no db_path", name="app")
        self._to_event = record_decoder(self._mapper)
        self._to_events = records_decoder(self._mapper)
        self._batch_size = batch_size
        self._lock = threading.RLock()
        self._store = None if db_path is None else ReadModel(db_path)
        self._clear()
        self.records_read = 0  # records folded since construction (restart cost, in tests)
        self.persist_error: Exception | None = None  # why the read model lags, if it does
        if self._store is not None:
            self._load(self._store)

    def _clear(self) -> None:
        self._images: dict[uuid.UUID, Image] = {}
        self._workers: dict[uuid.UUID, str] = {}
        self._users: dict[str, set[uuid.UUID]] = {}  # volume -> images whose chain holds it
        self._producers: dict[str, uuid.UUID] = {}  # volume -> image whose stage will make it
        # Volumes a deep check found damaged: by volume, each owner's record (docs/adr/0033),
        # and the latest of them, which statuses read.
        self._damage: dict[str, dict[uuid.UUID, DamageRecord]] = {}
        self._damaged: dict[str, DamageRecord] = {}
        self._checkpoint = _START
        self._repository: RepositoryInfo | None = None
        self._unsaved: set[uuid.UUID] = set()  # rows the read model has not caught up with
        self._origin_ns: int | None = None  # the first record's time, until the model has it

    def _load(self, store: ReadModel) -> None:
        stored = store.load()
        if stored is None or not self._same_log(stored.checkpoint, stored.origin_ns):
            store.reset()  # empty, for other code, or of another log: rebuilt by catch_up
            return
        for image, worker in stored.images:
            self._images[image.id] = image
            if worker is not None:
                self._workers[image.id] = worker
            self._reindex(image.id, None, image)
        self._checkpoint = stored.checkpoint
        if stored.repository is not None:
            self._repository = RepositoryInfo(**stored.repository)

    def _same_log(self, checkpoint: Checkpoint, origin_ns: int | None) -> bool:
        """Whether the record at the checkpoint is still the one the model folded.

        A log shorter than the model is another log (the repository was formatted anew) or
        this one cut short. The model is a witness that its records were committed
        (engine/log/witness.py): if the log still begins with the repository the model
        folded (its first record is the one the model saw first), records were lost, and that
        is :class:`LogCorrupted`, not a reason to forget.
        """
        if checkpoint.position == 0:
            return True
        log = self._own_log()
        last = log.refresh()
        if checkpoint.position > last:
            first = log.read(1, 1)
            if origin_ns is not None and first and first[0].time_ns == origin_ns:
                segment, offset = log.end_position()
                raise LogCorrupted(
                    f"this host's read model ({self._store_path()}) holds records up to "
                    f"sequence {checkpoint.position} of this repository's log, which now ends "
                    f"at {last}: the log was cut. If it was restored from a backup on purpose, "
                    "remove the read model to accept the loss",
                    segment=segment,
                    offset=offset,
                )
            return False
        [record] = log.read(checkpoint.position, checkpoint.position, 1)
        return (record.prev_hash, record.time_ns) == (checkpoint.prev_hash, checkpoint.time_ns)

    def _store_path(self) -> str:
        return "" if self._store is None else self._store.path

    # --- keeping up -----------------------------------------------------------------------

    def catch_up(self, *, refresh: bool = True) -> int:
        """Fold the records appended since the last call; return the new position.

        ``refresh=False`` skips looking for other hosts' appends and folds only what this
        process already knows of (its own saves): the cheapest read-your-writes.
        """
        with self._lock:
            log = self._own_log()
            last = log.refresh() if refresh else log.last_seq
            if last < self._checkpoint.position:
                segment, offset = log.end_position()
                raise LogCorrupted(
                    f"the log ends at sequence {last} but this view folded records up to "
                    f"{self._checkpoint.position}: the log was cut or replaced",
                    segment=segment,
                    offset=offset,
                )
            while self._checkpoint.position < last:
                records = log.read(self._checkpoint.position + 1, last, self._batch_size)
                self._persist(self._fold(records))
            return self._checkpoint.position

    def fold(self, records: Sequence[Record]) -> int:
        """Fold records read elsewhere, after :attr:`position`, in log order, ending with a
        whole transaction; return the new position. For detached views. The caller may leave
        out records whose effect a later one overwrites (engine/projections/point_in_time.py)."""
        with self._lock:
            if records:
                if records[0].seq <= self._checkpoint.position:
                    raise InvalidParameter(
                        f"record {records[0].seq} is not after {self._checkpoint.position}",
                        name="records",
                    )
                self._persist(self._fold(records))
            return self._checkpoint.position

    def _own_log(self) -> OperationLog:
        if self._log is None:
            raise InvalidParameter("a detached view reads no log; fold() feeds it", name="log")
        return self._log

    def rebuild(self) -> int:
        """Forget everything and fold the whole log again."""
        with self._lock:
            self._restart()
            return self.catch_up()

    def _restart(self) -> None:
        self._clear()
        if self._store is not None:
            self._store.reset()

    def _fold(self, records: Sequence[Record]) -> set[uuid.UUID]:
        """Apply records; return the images whose row changed. All or nothing on error."""
        if records and records[0].seq == 1:
            self._origin_ns = records[0].time_ns  # which log this is (see _same_log)
        # Keyed by the record's originator key (bytes hash in C, a UUID in Python) until the end.
        ids: dict[bytes | str, uuid.UUID] = {}
        before: dict[bytes | str, Image | None] = {}  # copy-on-write: as the batch found them
        staged: dict[bytes | str, Image] = {}
        workers: dict[bytes | str, str] = {}
        repository = self._repository
        image_event, images, is_work = Image.Event, self._images, _is_work
        for record, event in self._decoded(records):
            if isinstance(event, image_event):
                key = record.originator_key
                image = staged.get(key)
                if image is None:
                    image_id = ids[key] = event.originator_id
                    current = before[key] = images.get(image_id)
                    image = staged[key] = Image() if current is None else clone(current)
                image.apply(event)
                work = is_work.get(type(event))
                if work is None:
                    work = is_work[type(event)] = isinstance(event, _WORK)
                if work:
                    workers[key] = event.host_id
            elif isinstance(event, Repository.Created):
                repository = RepositoryInfo(
                    event.format_name,
                    event.format_version,
                    event.host_id,
                    event.timestamp.isoformat(),
                )
            # Events of aggregates a later version adds are not this view's business.
        self.records_read += len(records)
        # Only a read model has rows to rewrite: a detached view skips hashing the ids again.
        saving = self._store is not None
        dirty = set(ids.values()) if saving else set()
        for key, image in staged.items():
            images[ids[key]] = image
            affected = self._reindex(ids[key], before[key], image)
            if saving:
                dirty |= affected
        for key, host_id in workers.items():
            self._workers[ids[key]] = host_id
        self._repository = repository
        last = records[-1]
        self._checkpoint = Checkpoint(last.seq, last.prev_hash, last.time_ns)
        return dirty

    def _decoded(self, records: Sequence[Record]) -> Iterator[tuple[Record, Any]]:
        """Each record with its event, decoded a few records at a time: events still in the
        CPU's cache when they are applied. Decoding a whole batch of 20,000 first made the fold
        slower, not faster (docs/adr/0014)."""
        to_events = self._to_events
        listed = records if isinstance(records, list) else list(records)
        for start in range(0, len(listed), _DECODE_CHUNK):
            chunk = listed[start : start + _DECODE_CHUNK]
            yield from zip(chunk, to_events(chunk), strict=True)

    def _reindex(self, key: uuid.UUID, old: Image | None, image: Image) -> set[uuid.UUID]:
        """Update the volume indexes from the image as they last saw it (``old``, None if
        never); return the images whose readiness may have changed."""
        old_chain, old_pending = ((), set()) if old is None else (old.chain, old.pending_volumes())
        chain, pending = image.chain, image.pending_volumes()
        if chain != old_chain:
            for ref in old_chain:
                if ref not in chain:
                    users = self._users[ref]
                    users.discard(key)
                    if not users:
                        del self._users[ref]
            for ref in chain:
                self._users.setdefault(ref, set()).add(key)
        affected: set[uuid.UUID] = set()
        old_damage = {} if old is None else old.damage
        if image.damage is not old_damage:  # replaced, never changed in place
            for ref in old_damage.keys() | image.damage.keys():
                if old_damage.get(ref) is not image.damage.get(ref):
                    self._index_damage(key, ref, image.damage.get(ref))
                    affected |= self._users.get(ref, set())
        if pending != old_pending:
            for ref in old_pending - pending:
                if self._producers.get(ref) == key:
                    del self._producers[ref]
            for ref in pending - old_pending:
                self._producers[ref] = key
            for ref in pending ^ old_pending:
                affected |= self._users.get(ref, set())
        return affected

    def _index_damage(self, key: uuid.UUID, ref: str, record: DamageRecord | None) -> None:
        owners = self._damage.setdefault(ref, {})
        if record is None:
            owners.pop(key, None)
        else:
            owners[key] = record
        if owners:
            self._damaged[ref] = max(owners.values(), key=lambda r: r["found_on"])
        else:
            del self._damage[ref]
            self._damaged.pop(ref, None)

    def _persist(self, dirty: set[uuid.UUID]) -> None:
        if self._store is None:
            return
        # Kept until written, so a failed write is retried by the next batch rather than lost.
        self._unsaved |= dirty
        rows = [
            image_row(
                self._images[key], self._workers.get(key), image_status(self._images[key], self)
            )
            for key in self._unsaved
        ]
        repository = None if self._repository is None else self._repository.to_dict()
        try:
            self._store.save(self._checkpoint, repository, rows, self._origin_ns)
        except (sqlite3.Error, OSError) as e:
            # The read model is a cache (a full or read-only state directory): the view in
            # memory is whole, and the rows are written with a later batch once it works.
            self.persist_error = e
            return
        self.persist_error = None
        self._unsaved.clear()
        self._origin_ns = None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # --- queries --------------------------------------------------------------------------
    # Single dictionary reads need no lock: each is atomic, and the images are copy-on-write.

    @property
    def position(self) -> int:
        """The log sequence number of the last record folded."""
        return self._checkpoint.position

    @property
    def repository(self) -> RepositoryInfo | None:
        return self._repository

    def image(self, image_id: uuid.UUID | str) -> Image | None:
        """The image's state (removed images included), or None if the log never named it."""
        try:
            return self._images.get(image_key(image_id))
        except ValueError:
            return None

    def images(self) -> list[Image]:
        """Every image the log names, removed ones included."""
        with self._lock:
            return list(self._images.values())

    def live_images(self) -> list[Image]:
        with self._lock:
            return [i for i in self._images.values() if not i.removed]

    def worker(self, image_id: uuid.UUID) -> str | None:
        """The last host that claimed, ran, completed or failed a stage of the image."""
        return self._workers.get(image_id)

    def users_of(self, volume: str) -> list[Image]:
        """Images whose chain holds ``volume``, REMOVED ONES INCLUDED, by id."""
        with self._lock:
            ids = sorted(self._users.get(volume, ()), key=str)
            return [self._images[i] for i in ids]

    def live_users_of(self, volume: str) -> list[Image]:
        """Images not removed whose chain holds ``volume``, by id."""
        return [i for i in self.users_of(volume) if not i.removed]

    def producer_of(self, volume: str) -> Image | None:
        """The image whose unfinished stage will produce ``volume``, if any."""
        key = self._producers.get(volume)
        return None if key is None else self._images.get(key)

    def is_ready(self, volume: str) -> bool:
        """True unless an unfinished stage of some image will still produce ``volume``."""
        return volume not in self._producers

    def damaged(self) -> Mapping[str, DamageRecord]:
        """Volumes a deep check found damaged and no stage of their owner made again since,
        with the latest record of each (docs/adr/0033). Read-only."""
        return self._damaged

    def referenced_volumes(self, live_only: bool) -> set[str]:
        """Volumes in the chain of some image (of some live image, with ``live_only``)."""
        with self._lock:
            if not live_only:
                return set(self._users)
            images = self._images
            return {
                ref for ref, ids in self._users.items() if any(not images[i].removed for i in ids)
            }

    def history(self, image_id: uuid.UUID | str) -> list[Image.Event]:
        """The image's events from the log, oldest first (an auditor's view, read each time)."""
        log = self._own_log()
        log.refresh()
        return [self._to_event(record) for record in log.events_of(image_key(image_id))]
