"""Records of a read-only log as domain events, for replay and audits.

:class:`ReplayMapper` decodes as eventsourcing's mapper does, upcasting included, with the
per-class lookups done once;
:func:`without_superseded` leaves out progress and claim records whose every effect a later
record overwrites (most of a busy log); :func:`locate` says where a record lies on disk, for
reporting an event that does not decode.

Imports: ``engine.aggregates``, ``engine.errors``, ``engine.log``, ``engine.persistence``,
eventsourcing; the standard library.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from eventsourcing.persistence import (
    Mapper,
    MapperDeserialisationError,
    StoredEvent,
    find_id_convertor,
)
from eventsourcing.utils import resolve_topic

from engine.aggregates.image import Image
from engine.aggregates.topics import register_topics
from engine.errors import InvalidParameter
from engine.log import segments
from engine.log.framing import Record, id_of
from engine.log.scan import scan
from engine.persistence.transcoder import default_transcoder

_CLAIMED, _PROGRESSED, _COMPLETED = (
    Image.StageClaimed.TOPIC,
    Image.StageProgressed.TOPIC,
    Image.StageCompleted.TOPIC,
)
# Records whose every effect the next kept record of the same image, if of one of these
# topics, sets again. The aggregate lets only the current operation's next stage be claimed,
# progressed or completed, and only under the latest claim. A StageProgressed sets the
# operation's percent, the image's version, time and last host, and the view's worker; a
# StageClaimed sets these and the operation's claim host and epoch, which a later claim sets
# again, and so does the completion (Image applies its epoch, the claim's).
_SUPERSEDED_BY = {
    _PROGRESSED: frozenset((_CLAIMED, _PROGRESSED, _COMPLETED)),
    _CLAIMED: frozenset((_CLAIMED, _COMPLETED)),
}


_Known = tuple[type, Callable[[Any], Any], int]  # an event class, its id convertor, its version


class ReplayMapper(Mapper[Any]):
    """eventsourcing's ``Mapper`` that looks up what it needs per event class once, not per
    event: replay decodes millions. ``to_domain_event`` gives what the library's does for
    Strata's mapper (msgpack transcoder, no cipher, no compressor), upcasting included."""

    def __init__(self) -> None:
        super().__init__(default_transcoder())
        self._decode = self.transcoder.decode
        self._classes: dict[tuple[str, type], _Known] = {}
        self._uuid_classes: dict[str, _Known] = {}  # the same, for UUID ids (by topic alone)

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        return self.event(
            stored_event.topic,
            stored_event.originator_id,
            stored_event.originator_version,
            stored_event.state,
        )

    def record_event(self, record: Record) -> Any:
        """``to_domain_event`` of the record's ``StoredEvent``, without building one."""
        topic, key = record.topic, record.originator_key
        if not isinstance(key, bytes):  # an id that is not a UUID: the log keeps it as is
            return self.event(topic, key, record.originator_version, record.state)
        known = self._uuid_classes.get(topic)  # one lookup, no key tuple: most records
        if known is None:
            known = self._uuid_classes[topic] = self._class(topic, uuid.UUID)
        return self._event(known, topic, id_of(key), record.originator_version, record.state)

    def record_events(self, records: list[Record]) -> list[Any]:
        """:meth:`record_event` of each record."""
        record_event = self.record_event
        return [record_event(record) for record in records]

    def event(
        self, topic: str, originator_id: uuid.UUID | str, originator_version: int, stored: bytes
    ) -> Any:
        key = (topic, type(originator_id))
        known = self._classes.get(key)
        if known is None:
            known = self._classes[key] = self._class(topic, type(originator_id))
        return self._event(known, topic, originator_id, originator_version, stored)

    @staticmethod
    def _class(topic: str, id_type: type) -> _Known:
        cls = resolve_topic(topic)
        convert = find_id_convertor(cls, cast(Hashable, id_type))
        return cls, convert, getattr(cls, "class_version", 1)

    def _event(
        self,
        known: _Known,
        topic: str,
        originator_id: uuid.UUID | str,
        originator_version: int,
        stored: bytes,
    ) -> Any:
        cls, convert, class_version = known
        try:
            state: dict[str, Any] = self._decode(stored)
        except Exception as e:  # the library's wording and type, so callers see one error
            raise MapperDeserialisationError(
                f"Failed to deserialise state of stored event with topic '{topic}', "
                f"originator_id '{originator_id}' and originator_version "
                f"{originator_version}: {e}"
            ) from e
        state["originator_id"] = convert(originator_id)
        state["originator_version"] = originator_version
        version = state.pop("class_version", 1)
        while version < class_version:
            getattr(cls, f"upcast_v{version}_v{version + 1}")(state)
            version += 1
        event: Any = object.__new__(cls)
        object.__setattr__(event, "__dict__", state)
        return event


def new_mapper() -> Mapper[Any]:
    register_topics()
    return ReplayMapper()


def to_event(mapper: Mapper[Any], record: Record) -> Any:
    """The domain event a record holds, upcast to its class's current version."""
    return record_decoder(mapper)(record)


def records_decoder(mapper: Mapper[Any]) -> Callable[[list[Record]], list[Any]]:
    """What :func:`to_event` does with ``mapper``, for a list of records at a time."""
    if isinstance(mapper, ReplayMapper):
        return mapper.record_events
    decode = record_decoder(mapper)
    return lambda records: [decode(record) for record in records]


def record_decoder(mapper: Mapper[Any]) -> Callable[[Record], Any]:
    """What :func:`to_event` does with ``mapper``, as one function to call for many records."""
    if isinstance(mapper, ReplayMapper):
        return mapper.record_event
    to_domain_event = mapper.to_domain_event

    def decode(record: Record) -> Any:
        return to_domain_event(
            StoredEvent(record.originator_id, record.originator_version, record.topic, record.state)
        )

    return decode


def without_superseded(batch: Sequence[Record]) -> list[Record]:
    """``batch`` less each StageProgressed or StageClaimed whose every effect the image's
    next kept record in it sets again (most of a busy log: progress is throttled, not rare).

    Leaving a record out is transitive: a progress record followed by a claim that the
    completion overwrites is overwritten by the completion too, whose effects hold the claim's.
    """
    later: dict[bytes | str, str] = {}  # each image's next kept record's topic, so far
    superseded_by = _SUPERSEDED_BY
    kept = []
    for record in reversed(batch):
        key, topic = record.originator_key, record.topic
        by = superseded_by.get(topic)
        if by is not None and later.get(key) in by:
            continue
        later[key] = topic
        kept.append(record)
    kept.reverse()
    return kept


def locate(log_dir: str, seq: int) -> tuple[int, int]:
    """The segment and byte offset of record ``seq`` (of a log the reader found sound)."""
    numbers = segments.list_segments(log_dir)
    for number in reversed(numbers):
        path = segments.segment_path(log_dir, number)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header, data_start = segments.read_header(fd, path, number)
            if header.first_seq > seq:
                continue
            size = os.fstat(fd).st_size
            buf = os.pread(fd, size - data_start, data_start)
        finally:
            os.close(fd)
        found = scan(buf, data_start, number, header.first_seq, header.prev_hash)
        return number, found.offsets[seq - header.first_seq]
    raise InvalidParameter(f"no record {seq} in {log_dir}", name="seq")
