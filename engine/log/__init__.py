"""The per-repository append-only operation log (format: docs/adr/0002-operation-log-format.md).

Imports: the standard library and :mod:`engine.errors` only: the bottom of the engine, which
knows no event, aggregate or eventsourcing (docs/adr/0025-layers-and-the-import-rule.md).
"""

from engine.log.batch import NewEvent
from engine.log.framing import VERSION, Record
from engine.log.store import OperationLog

__all__ = ["VERSION", "NewEvent", "OperationLog", "Record"]
