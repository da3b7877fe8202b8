"""eventsourcing persistence over the repository's operation log.

Set ``PERSISTENCE_MODULE=engine.persistence`` in an ``Application``'s environment (see
:mod:`engine.persistence.factory` for the other keys). eventsourcing finds the factory by
looking for the one ``InfrastructureFactory`` subclass in this module, so import no other.

Imports: :mod:`engine.log`, :mod:`engine.errors` and :mod:`engine.opaque` only: an adapter,
it knows no aggregate (docs/adr/0025-layers-and-the-import-rule.md).
"""

from engine.persistence.factory import LogInfrastructureFactory
from engine.persistence.recorders import LogAggregateRecorder, LogApplicationRecorder
from engine.persistence.shared import acquire_log, release_log
from engine.persistence.transcoder import MsgpackTranscoder, TupleAsList, default_transcoder

__all__ = [
    "LogAggregateRecorder",
    "LogApplicationRecorder",
    "LogInfrastructureFactory",
    "MsgpackTranscoder",
    "TupleAsList",
    "acquire_log",
    "default_transcoder",
    "release_log",
]
