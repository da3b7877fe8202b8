"""The per-repository append-only operation log (format: docs/adr/0002-operation-log-format.md)."""

from engine.log.batch import NewEvent
from engine.log.framing import VERSION, Record
from engine.log.store import OperationLog

__all__ = ["VERSION", "NewEvent", "OperationLog", "Record"]
