"""The eventsourcing infrastructure factory that wires an application onto a repository's log.

An ``Application`` whose environment has ``PERSISTENCE_MODULE=engine.persistence`` gets:

======================  ===================================================================
``STRATA_LOG_DIR``      the log directory (required), e.g. ``<repository>/log``
``STRATA_HOST_ID``      this host's id, written into every record (required)
``STRATA_CREATE_LOG``   ``y`` to create the log if the directory holds none (default ``n``)
``STRATA_SEGMENT_SIZE`` bytes after which the log rolls over to a new segment (optional)
======================  ===================================================================

Event state is encoded with :class:`MsgpackTranscoder` unless ``TRANSCODER_TOPIC`` names
another, and events are mapped by :class:`LogMapper` unless ``MAPPER_TOPIC`` names another
mapper. Snapshots, tracking recorders and process applications are refused
(:class:`NotSupported`): a snapshot store and tracking positions have no home in the shared log,
and the engine's read models follow the log themselves (engine/projections/read_model.py).

Imports: :mod:`engine.log`, :mod:`engine.errors` and this package; the application that uses
the factory registers the aggregates' topics (docs/adr/0025-layers-and-the-import-rule.md).
"""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    EventStore,
    InfrastructureFactory,
    Mapper,
    ProcessRecorder,
    TrackingRecorder,
    Transcoder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic, strtobool

from engine.errors import InvalidParameter, NotSupported
from engine.log import OperationLog
from engine.persistence.event_store import LogEventStore
from engine.persistence.mapper import LogMapper
from engine.persistence.recorders import LogAggregateRecorder, LogApplicationRecorder
from engine.persistence.shared import acquire_log, release_log
from engine.persistence.transcoder import default_transcoder


class LogInfrastructureFactory(InfrastructureFactory[TrackingRecorder]):
    STRATA_LOG_DIR = "STRATA_LOG_DIR"
    STRATA_HOST_ID = "STRATA_HOST_ID"
    STRATA_CREATE_LOG = "STRATA_CREATE_LOG"
    STRATA_SEGMENT_SIZE = "STRATA_SEGMENT_SIZE"

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        directory = self._required(self.STRATA_LOG_DIR)
        host_id = self._required(self.STRATA_HOST_ID)
        segment_size = self._optional_int(self.STRATA_SEGMENT_SIZE)
        self._log: OperationLog | None = acquire_log(
            directory,
            host_id,
            create=self._flag(self.STRATA_CREATE_LOG),
            segment_size=segment_size,
        )

    @property
    def log(self) -> OperationLog:
        if self._log is None:
            raise NotSupported("the factory was closed", feature="Using a closed factory")
        return self._log

    def transcoder(self) -> Transcoder:
        if self.env.get(self.TRANSCODER_TOPIC):
            return super().transcoder()
        return default_transcoder()

    def mapper(
        self, transcoder: Transcoder | None = None, mapper_class: type[Mapper[Any]] | None = None
    ) -> Mapper[Any]:
        # MAPPER_TOPIC, when set, still names the class, as it does for the library's factories.
        if mapper_class is None and not self.env.get(self.MAPPER_TOPIC):
            mapper_class = LogMapper
        return super().mapper(transcoder, mapper_class)

    def event_store(
        self, mapper: Mapper[Any] | None = None, recorder: AggregateRecorder | None = None
    ) -> EventStore[Any]:
        return LogEventStore(
            mapper=mapper or self.mapper(), recorder=recorder or self.application_recorder()
        )

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose != "events":
            raise NotSupported(
                f"only the log's events are stored, not {purpose!r}; snapshots would need a "
                "store beside the log (leave IS_SNAPSHOTTING_ENABLED unset)",
                feature=f"An aggregate recorder for {purpose!r}",
            )
        return LogAggregateRecorder(self.log)

    def application_recorder(self) -> ApplicationRecorder:
        recorder_class: type[LogApplicationRecorder] = LogApplicationRecorder
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        if topic:
            recorder_class = resolve_topic(topic)
            if not (
                isinstance(recorder_class, type)
                and issubclass(recorder_class, LogApplicationRecorder)
            ):
                raise InvalidParameter(
                    f"{topic} is not a LogApplicationRecorder",
                    name=self.APPLICATION_RECORDER_TOPIC,
                )
        return recorder_class(self.log)

    def tracking_recorder(
        self, tracking_recorder_class: type[TrackingRecorder] | None = None
    ) -> TrackingRecorder:
        raise NotSupported(
            "a read model keeps its log position in its own database, written with its rows "
            "(engine/projections/read_model.py), not in a tracking recorder",
            feature="A tracking recorder",
        )

    def process_recorder(self) -> ProcessRecorder:
        raise NotSupported(
            "a process application must commit its tracking position atomically with the "
            "events it appends, and the shared log does not record tracking; follow the log "
            "with a read model (engine/projections/read_model.py) instead",
            feature="A process recorder",
        )

    def close(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            release_log(log)

    def _required(self, key: str) -> str:
        value = self.env.get(key)
        if not value:
            raise InvalidParameter(
                f"set it in the application's environment (looked for {self.env.create_keys(key)})",
                name=key,
            )
        return value

    def _flag(self, key: str) -> bool:
        value = self.env.get(key, "n") or "n"
        try:
            return bool(strtobool(value))
        except ValueError as e:
            raise InvalidParameter(f"yes or no, not {value!r}", name=key) from e

    def _optional_int(self, key: str) -> int | None:
        value = self.env.get(key)
        try:
            return int(value) if value else None
        except ValueError as e:
            raise InvalidParameter(f"a whole number, not {value!r}", name=key) from e
