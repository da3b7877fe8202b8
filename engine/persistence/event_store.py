"""eventsourcing's ``EventStore`` for the log, with cheaper :class:`Recording` objects.

A save returns one ``Recording`` (and its ``Notification``) per event. The library builds them
as frozen dataclasses, whose ``__init__`` pays an ``object.__setattr__`` per field: about 1.3 us
an event, spent while holding the GIL that the other saving threads of a group commit wait for.
Here the same objects (same class, same fields, equal to the library's) are filled in through
their ``__dict__``.

Imports: eventsourcing; the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import EventStore, Notification, Recording, StoredEvent

_new = object.__new__


class LogEventStore(EventStore[Any]):
    def put(
        self, domain_events: Sequence[DomainEventProtocol[Any]], **kwargs: Any
    ) -> list[Recording[Any]]:
        """Stores domain events in aggregate sequence (as the library's ``put`` does)."""
        to_stored_event = self.mapper.to_stored_event
        stored_events = [to_stored_event(event) for event in domain_events]
        notification_ids = self.recorder.insert_events(stored_events, **kwargs)
        recordings: list[Recording[Any]] = []
        if not notification_ids:
            return recordings
        if len(notification_ids) != len(stored_events):
            raise AssertionError("the recorder returned one notification id per event")
        for event, stored, n_id in zip(domain_events, stored_events, notification_ids, strict=True):
            if type(stored) is StoredEvent:  # a mapper's own class could have other fields
                notification = _new(Notification)
                notification.__dict__.update(stored.__dict__, id=n_id)
                recording = _new(Recording)
                recording.__dict__.update(domain_event=event, notification=notification)
            else:
                recording = Recording(
                    event,
                    Notification(
                        originator_id=stored.originator_id,
                        originator_version=stored.originator_version,
                        topic=stored.topic,
                        state=stored.state,
                        id=n_id,
                    ),
                )
            recordings.append(recording)
        return recordings
