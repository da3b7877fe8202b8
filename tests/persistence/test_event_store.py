"""The log's event store returns the recordings the library's EventStore would return."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from eventsourcing.persistence import Notification, Recording

from engine.aggregates.repository import Repository
from engine.application import LogConfig, StrataLogApplication
from engine.persistence.event_store import LogEventStore
from tests.persistence.test_application import CREATED_AT


def test_a_save_returns_recordings_equal_to_the_librarys(tmp_path: Path) -> None:
    config = LogConfig(log_dir=str(tmp_path / "log"), host_id="host-a", create=True)
    with StrataLogApplication(config) as app:
        assert isinstance(app.events, LogEventStore)
        repository = Repository.create(
            format_name="localfs", format_version="1.0", host_id="host-a", created_at=CREATED_AT
        )
        [event] = repository.collect_events()
        [recording] = app.events.put([event])
        [stored] = app.recorder.select_notifications(1, 1)
        # What the library's EventStore.put builds from the same event and notification id.
        expected = Recording(event, Notification(**vars(app.mapper.to_stored_event(event)), id=1))
        assert type(recording) is Recording and type(recording.notification) is Notification
        assert recording == expected
        assert recording.notification == stored
        assert repr(recording) == repr(expected)
        with pytest.raises(FrozenInstanceError):
            recording.notification.id = 2  # type: ignore[misc]
