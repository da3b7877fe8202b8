"""What every aggregate does the same way: record events, hand them over, be rebuilt from them.

The explicit style of eventsourcing's ``aggregate4`` example: an aggregate's ``apply`` (a
``singledispatchmethod``) is the only place state changes, both when a command records a new
event and when the repository replays stored ones, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, Self, TypeVar

E = TypeVar("E")


class Aggregate(Generic[E]):
    def __init__(self) -> None:
        self._pending: list[E] = []

    def apply(self, event: Any) -> None:
        raise NotImplementedError

    def _record(self, event: E) -> None:
        self.apply(event)
        self._pending.append(event)

    def collect_events(self) -> list[E]:
        """The events recorded since the last call, for the application to save."""
        events, self._pending = self._pending, []
        return events

    @classmethod
    def project(cls, aggregate: Self | None, events: Iterable[E]) -> Self | None:
        """eventsourcing's projector function: the state after ``events``."""
        for event in events:
            if aggregate is None:
                aggregate = cls()
            aggregate.apply(event)
        return aggregate
