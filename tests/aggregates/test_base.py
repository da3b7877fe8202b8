"""An aggregate's apply finds the method registered for the event's class, or its base's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from engine.aggregates.base import Aggregate, Appliers


@dataclass(frozen=True)
class Event:
    n: int


@dataclass(frozen=True)
class Added(Event):
    pass


@dataclass(frozen=True)
class AddedTwice(Added):
    pass


@dataclass(frozen=True)
class Unknown(Event):
    pass


class Counter(Aggregate[Event]):
    _appliers: ClassVar[Appliers[Counter]] = Appliers("Counter")
    total = 0

    def apply(self, event: Event) -> None:
        self._appliers(self, event)

    @_appliers.register(Added)
    def _(self, event: Added) -> None:
        self.total += event.n

    @_appliers.register(AddedTwice)
    def _(self, event: AddedTwice) -> None:
        self.total += 2 * event.n


def test_each_event_class_is_applied_by_its_own_method() -> None:
    counter = Counter()
    counter._record(Added(1))
    counter._record(AddedTwice(10))
    assert counter.total == 21
    assert counter.collect_events() == [Added(1), AddedTwice(10)]


def test_an_event_of_a_subclass_is_applied_by_its_nearest_registered_base() -> None:
    @dataclass(frozen=True)
    class AddedLater(Added):
        pass

    counter = Counter.project(None, [AddedLater(3), AddedLater(4)])
    assert counter is not None and counter.total == 7


def test_an_event_with_no_method_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="Counter cannot apply Unknown"):
        Counter().apply(Unknown(1))
