"""A small eventsourcing application over one repository's log, for the demo and the benchmarks.

A stepping stone: the StorageEngine facade will wire the same persistence for each connected
repository. Configuration is explicit (a :class:`LogConfig`), turned into the environment that
eventsourcing's factory reads; nothing here reads ``os.environ``.

Imports: the aggregates, the log and :mod:`engine.persistence`; nothing above them
(docs/adr/0025-layers-and-the-import-rule.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import ProgrammingError
from eventsourcing.persistence import Recording

from engine.aggregates.repository import REPOSITORY_ID, Repository
from engine.aggregates.topics import register_topics
from engine.errors import InvalidParameter
from engine.log import OperationLog
from engine.persistence import LogInfrastructureFactory

# The private steps of the library's Application.save, run after it collects the events;
# save_collected does what they do by public names instead (docs/adr/0024).
LIBRARY_SAVE_STEPS = ("_record", "_take_snapshots", "_notify")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Where the log is and who this host is."""

    log_dir: str
    host_id: str
    create: bool = False  # create the log if the directory holds none
    segment_size: int | None = None

    def to_env(self) -> dict[str, str]:
        env = {
            "PERSISTENCE_MODULE": "engine.persistence",
            LogInfrastructureFactory.STRATA_LOG_DIR: self.log_dir,
            LogInfrastructureFactory.STRATA_HOST_ID: self.host_id,
            LogInfrastructureFactory.STRATA_CREATE_LOG: "y" if self.create else "n",
        }
        if self.segment_size is not None:
            env[LogInfrastructureFactory.STRATA_SEGMENT_SIZE] = str(self.segment_size)
        return env


def save_collected(app: Application[Any], *objs: Any, **kwargs: Any) -> list[Recording[Any]]:
    """``Application.save``'s steps by the library's public names, without its runtime checks.

    The library's save collects the events (telling aggregates from events with ``isinstance``
    against runtime-checkable Protocols, which Python 3.11 re-derives on every call: about 20 us
    a save, a tenth of a durable commit, paid while holding the GIL that other saving threads
    wait for), then runs three private steps: ``_record`` (put the events in the event store,
    and the aggregates in the repository's cache when it does not fast-forward),
    ``_take_snapshots`` and ``_notify`` (a hook for eventsourcing's systems), then the
    deprecated public ``notify``. Here an object with ``collect_events()`` is an aggregate and
    anything else an event; the first step is done with the public event store and cache, and
    the second and third have nothing to do for an application that takes no snapshots and runs
    in no eventsourcing system (the log's factory refuses snapshot stores and process recorders;
    :class:`StrataLogApplication` refuses an override of the private steps). The bench saves
    eventsourcing's own SQLite application this way too, to compare like with like.
    """
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
    if app.snapshots is not None and app.snapshotting_intervals:
        raise ProgrammingError("snapshots are taken by a step of the library's save not run here")
    recordings: list[Recording[Any]] = app.events.put(events, tracking=None, **kwargs)
    repository = app.repository
    if repository.cache and not repository.fastforward:
        for aggregate_id, aggregate in aggregates.items():
            repository.cache.put(aggregate_id, aggregate)
    app.notify(events)  # deprecated by the library, still honoured by it
    return recordings


class StrataLogApplication(Application[UUID | str]):
    """Saves aggregates to, and rebuilds them from, the repository's operation log.

    A save runs the steps of the library's ``Application.save`` by the library's public names
    (:func:`save_collected`). The steps of that save that Strata has no use for are private
    methods of the library (docs/adr/0024-eventsourcing-by-its-public-names.md): a subclass
    that overrides one is refused when it is defined, rather than silently never called.
    """

    name = "StrataLog"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = [name for name in LIBRARY_SAVE_STEPS if name in cls.__dict__]
        if overridden:
            raise ProgrammingError(
                f"{cls.__qualname__} overrides {', '.join(overridden)}, which a save here does "
                "not call: its steps are save_collected's (docs/adr/0024)"
            )

    def __init__(self, config: LogConfig) -> None:
        if not isinstance(config, LogConfig):
            raise InvalidParameter(f"a LogConfig, not {type(config).__name__}", name="config")
        self.config = config
        # Stored events name classes by stable topic: make them resolvable before any read.
        register_topics()
        # Our keys override anything inherited from os.environ (eventsourcing merges it in).
        super().__init__(env=config.to_env())

    save = save_collected  # no frame of its own: every save of a group commit runs it

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
