"""eventsourcing's aggregate and application recorders, backed by the repository's operation log.

The log already is what these interfaces ask for: a total order of records (the notification
id is the log sequence number), the events of one aggregate by version, and refusal of an
append whose aggregate moved on (Strata's :class:`ConcurrencyConflict`, which eventsourcing
calls an ``IntegrityError``). Reads first catch up with what other processes appended, so an
application on one host sees the aggregates another host saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from engine.log.follow import LogFollower
from engine.persistence.subscription import LogSubscription

# How many records a topic-filtered select decodes per read while looking for matches.
_SCAN_BATCH = 1024

# The hook through which a subscription learns of other processes' appends: given the log, make
# a follower (engine/log/follow.py). Tests or a facade can pass their own, e.g. polling on NFS.
FollowerFactory = Callable[[OperationLog], LogFollower]


def follow_with(*, poll_interval: float = 1.0, polling: bool = False) -> FollowerFactory:
    """A follower factory: inotify (or a polling observer) plus a refresh every poll_interval."""

    def make(log: OperationLog) -> LogFollower:
        return LogFollower(log, poll_interval=poll_interval, polling=polling)

    return make


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

    def __init__(self, log: OperationLog, *, follower: FollowerFactory | None = None) -> None:
        super().__init__(log)
        self._make_follower = follower or follow_with()

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
        return LogSubscription(self, self._make_follower(self.log), gt=gt, topics=topics)


def _notification(record: Record) -> Notification:
    return Notification(
        id=record.seq,
        originator_id=record.originator_id,
        originator_version=record.originator_version,
        topic=record.topic,
        state=record.state,
    )
