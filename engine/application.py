"""A small eventsourcing application over one repository's log, for the demo and the benchmarks.

A stepping stone: the StorageEngine facade will wire the same persistence for each connected
repository. Configuration is explicit (a :class:`LogConfig`), turned into the environment that
eventsourcing's factory reads; nothing here reads ``os.environ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.persistence import Recording

from engine.aggregates.repository import REPOSITORY_ID, Repository
from engine.errors import InvalidParameter
from engine.log import OperationLog
from engine.persistence import LogInfrastructureFactory


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Where the log is and who this host is."""

    log_dir: str
    host_id: str
    create: bool = False  # create the log if the directory holds none
    segment_size: int | None = None
    tracking_db: str | None = None  # host-local SQLite file; None: in memory
    poll_seconds: float | None = None  # how often subscriptions look for other hosts' appends

    def to_env(self) -> dict[str, str]:
        env = {
            "PERSISTENCE_MODULE": "engine.persistence",
            LogInfrastructureFactory.STRATA_LOG_DIR: self.log_dir,
            LogInfrastructureFactory.STRATA_HOST_ID: self.host_id,
            LogInfrastructureFactory.STRATA_CREATE_LOG: "y" if self.create else "n",
        }
        if self.segment_size is not None:
            env[LogInfrastructureFactory.STRATA_SEGMENT_SIZE] = str(self.segment_size)
        if self.tracking_db is not None:
            env[LogInfrastructureFactory.STRATA_TRACKING_DB] = self.tracking_db
        if self.poll_seconds is not None:
            env[LogInfrastructureFactory.STRATA_POLL_SECONDS] = str(self.poll_seconds)
        return env


class StrataLogApplication(Application[UUID | str]):
    """Saves aggregates to, and rebuilds them from, the repository's operation log."""

    name = "StrataLog"

    def __init__(self, config: LogConfig) -> None:
        if not isinstance(config, LogConfig):
            raise InvalidParameter(f"a LogConfig, not {type(config).__name__}", name="config")
        self.config = config
        # Our keys override anything inherited from os.environ (eventsourcing merges it in).
        super().__init__(env=config.to_env())

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID | str]]:
        if kwargs or not self._plain_save():
            return save_collected(self, *objs, **kwargs)
        # save_collected's steps without the ones that do nothing here: no ProcessingEvent (no
        # tracking, no saved kwargs), and no call of the library's no-op hooks (no snapshots,
        # _notify and notify not overridden). About 1 us an event, spent while the other
        # saving threads of a group commit wait for the GIL.
        events: list[Any] = []
        aggregates: dict[Any, Any] = {}
        for obj in objs:
            if obj is None:
                continue
            collect = getattr(obj, "collect_events", None)
            if collect is None:
                events.append(obj)
            else:
                events.extend(collect())
                aggregates[obj.id] = obj
        recordings: list[Recording[UUID | str]] = self.events.put(events, tracking=None)
        repository = self.repository  # Application._record's cache update
        if repository.cache and not repository.fastforward:
            for aggregate_id, aggregate in aggregates.items():
                repository.cache.put(aggregate_id, aggregate)
        return recordings

    def _plain_save(self) -> bool:
        """Whether a save is the library's steps with nothing to do but record: its own
        ``_record`` and no-op hooks, no snapshot store (re-checked at every save: cheap)."""
        cls = type(self)
        return (
            cls._record is Application._record
            and cls._take_snapshots is Application._take_snapshots
            and cls._notify is Application._notify
            and cls.notify is Application.notify
            and not self.snapshots
        )

    @property
    def operation_log(self) -> OperationLog:
        """The operation log under this application (shared with this host's other users)."""
        factory = self.factory
        if not isinstance(factory, LogInfrastructureFactory):
            raise InvalidParameter("not wired to engine.persistence", name="PERSISTENCE_MODULE")
        return factory.log

    def create_repository(
        self, *, format_name: str, format_version: str, created_at: datetime
    ) -> Repository:
        """Record that this host formatted the repository (refused if it already was)."""
        repository = Repository.create(
            format_name=format_name,
            format_version=format_version,
            host_id=self.config.host_id,
            created_at=created_at,
        )
        self.save(repository)
        return repository

    def get_repository(self) -> Repository:
        repository: Repository = self.repository.get(
            REPOSITORY_ID, projector_func=Repository.project
        )
        return repository


def save_collected(app: Application[Any], *objs: Any, **kwargs: Any) -> list[Recording[Any]]:
    """``Application.save`` without its runtime Protocol checks, same steps otherwise.

    The library tells aggregates from events with ``isinstance`` against runtime-checkable
    Protocols, which Python 3.11 re-derives on every call: about 20 us a save, a tenth of a
    durable commit, paid while holding the GIL that other saving threads wait for. An object
    with ``collect_events()`` is an aggregate here; anything else is an event.
    """
    processing_event: ProcessingEvent[Any] = ProcessingEvent()
    for obj in objs:
        if obj is None:
            continue
        collect = getattr(obj, "collect_events", None)
        if collect is None:
            processing_event.events.append(obj)
        else:
            processing_event.events.extend(collect())
            processing_event.aggregates[obj.id] = obj
    processing_event.saved_kwargs.update(kwargs)
    recordings = app._record(processing_event)
    app._take_snapshots(processing_event)
    app._notify(recordings)
    app.notify(processing_event.events)  # deprecated by the library, still honoured by it
    return recordings
