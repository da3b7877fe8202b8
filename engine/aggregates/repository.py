"""The repository's own aggregate: what was formatted, with which format, by which host, when.

A repository has no persistent id (a host gives it a transient name when connecting), and its
log belongs to it alone, so its aggregate has one fixed id in that log. Creating it twice in
one log is refused by the log itself: the second ``Created`` would be version 1 again.

Pure: every value, the time included, is passed in by the caller.

Imports: its own package; the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import singledispatchmethod

from engine.aggregates.base import Aggregate
from engine.aggregates.topics import StableTopic

REPOSITORY_ID = "repository"


class Repository(Aggregate["Repository.Event"], StableTopic):
    TOPIC = "strata.repository.Repository"

    @dataclass(frozen=True, kw_only=True)
    class Event(StableTopic):
        TOPIC = "strata.repository.Repository.Event"

        originator_id: str
        originator_version: int
        timestamp: datetime

    @dataclass(frozen=True, kw_only=True)
    class Created(Event):
        TOPIC = "strata.repository.Repository.Created"

        format_name: str
        format_version: str
        host_id: str

    id: str
    version: int
    created_on: datetime
    modified_on: datetime
    format_name: str
    format_version: str
    created_by: str

    @classmethod
    def create(
        cls, *, format_name: str, format_version: str, host_id: str, created_at: datetime
    ) -> Repository:
        created = cls.Created(
            originator_id=REPOSITORY_ID,
            originator_version=1,
            timestamp=created_at,
            format_name=format_name,
            format_version=format_version,
            host_id=host_id,
        )
        repository = cls()
        repository._record(created)
        return repository

    @singledispatchmethod
    def apply(self, event: Repository.Event) -> None:
        raise NotImplementedError(f"Repository cannot apply {type(event).__qualname__}")

    @apply.register(Created)
    def _(self, event: Repository.Created) -> None:
        self.id = event.originator_id
        self.created_on = event.timestamp
        self.format_name = event.format_name
        self.format_version = event.format_version
        self.created_by = event.host_id
        self._advance(event)

    def _advance(self, event: Repository.Event) -> None:
        self.version = event.originator_version
        self.modified_on = event.timestamp
