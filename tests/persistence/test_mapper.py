"""The log's mapper turns an event into the StoredEvent the library's mapper would make."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from eventsourcing.compressor import ZlibCompressor
from eventsourcing.persistence import Mapper, StoredEvent

from engine.persistence.mapper import LogMapper
from engine.persistence.transcoder import default_transcoder


@dataclass(frozen=True)
class Noted:
    originator_id: UUID
    originator_version: int
    timestamp: datetime
    note: str


@dataclass(frozen=True)
class NotedV3(Noted):
    class_version = 3


@pytest.mark.parametrize("event_class", [Noted, NotedV3], ids=["version 1", "class version 3"])
def test_a_stored_event_equals_the_librarys(event_class: type[Noted]) -> None:
    event = event_class(uuid4(), 7, datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=UTC), "hello")
    transcoder = default_transcoder()
    ours = LogMapper(transcoder).to_stored_event(event)
    theirs = Mapper[UUID](transcoder).to_stored_event(event)
    assert type(ours) is StoredEvent
    assert ours == theirs and repr(ours) == repr(theirs) and hash(ours) == hash(theirs)
    assert vars(ours) == vars(theirs)  # same state bytes, so the same record on disk
    assert vars(event)["note"] == "hello"  # the event itself is left as it was
    with pytest.raises(FrozenInstanceError):
        ours.topic = "elsewhere"  # type: ignore[misc]


def test_a_compressing_mapper_stores_what_the_librarys_stores() -> None:
    event = Noted(uuid4(), 1, datetime(2026, 3, 1, tzinfo=UTC), "x" * 200)
    transcoder, compressor = default_transcoder(), ZlibCompressor()
    ours = LogMapper(transcoder, compressor=compressor).to_stored_event(event)
    assert ours == Mapper[UUID](transcoder, compressor=compressor).to_stored_event(event)
