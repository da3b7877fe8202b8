"""eventsourcing's aggregate and application recorders, backed by the repository's operation log.

The log already is what these interfaces ask for: a total order of records (the notification
id is the log sequence number), the events of one aggregate by version, and refusal of an
append whose aggregate moved on (Strata's :class:`ConcurrencyConflict`, which eventsourcing
calls an ``IntegrityError``). Reads first catch up with what other processes appended, so an
application on one host sees the aggregates another host saved.

Imports: :mod:`engine.log` and :mod:`engine.errors` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    IntegrityError,
    Notification,
    StoredEvent,
    Subscription,
)

from engine.errors import ConcurrencyConflict, NotSupported
from engine.log import OperationLog, Record

# How many records a topic-filtered select decodes per read while looking for matches.
_SCAN_BATCH = 1024


class LogAggregateRecorder(AggregateRecorder):
    """Stores and selects an aggregate's events in the log; returns no notification ids."""

    def __init__(self, log: OperationLog) -> None:
        self.log = log

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        self._append(stored_events, **kwargs)
        return None

    def _append(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> list[int]:
        """Append the events as one transaction; their sequence numbers, once durable. Raises
        the library's ``IntegrityError`` when an aggregate's version moved."""
        if kwargs.get("tracking") is not None:
            raise NotSupported(
                "the log records events only; a process application's tracking would need to "
                "be committed in the same transaction, which this recorder does not do",
                feature="Recording a tracking position with events",
            )
        if not stored_events:
            return []
        try:
            return self.log.append(stored_events)  # a StoredEvent has what a NewEvent has
        except ConcurrencyConflict as e:
            raise IntegrityError(e.message) from e

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        self.log.refresh()
        return [
            StoredEvent(r.originator_id, r.originator_version, r.topic, r.state)
            for r in self.log.events_of(originator_id, gt=gt, lte=lte, desc=desc, limit=limit)
        ]


class LogApplicationRecorder(LogAggregateRecorder, ApplicationRecorder):
    """Also the application sequence: notification ids are log sequence numbers, from 1."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        return self._append(stored_events, **kwargs)

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        first = 1 if start is None else start if inclusive_of_start else start + 1
        if limit <= 0:
            return []
        self.log.refresh()
        if not topics:
            return [_notification(r) for r in self.log.read(first, stop, limit)]
        wanted = frozenset(topics)
        found: list[Notification] = []
        while len(found) < limit:
            batch = self.log.read(first, stop, _SCAN_BATCH)
            if not batch:
                break
            for record in batch:
                if record.topic in wanted:
                    found.append(_notification(record))
                    if len(found) == limit:
                        break
            first = batch[-1].seq + 1
        return found

    def max_notification_id(self) -> int | None:
        return self.log.refresh() or None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        raise NotSupported(
            "the engine follows the log itself (engine/log/follow.py) and keeps its read "
            "models' positions beside them, not through eventsourcing's subscriptions",
            feature="Subscribing to the application sequence",
        )


def _notification(record: Record) -> Notification:
    return Notification(
        id=record.seq,
        originator_id=record.originator_id,
        originator_version=record.originator_version,
        topic=record.topic,
        state=record.state,
    )
