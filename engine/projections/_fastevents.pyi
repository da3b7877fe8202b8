"""Types of the C loop that makes records into events (engine/projections/_fastevents.c)."""

from collections.abc import Callable
from typing import Any

from engine.log.framing import Record

def build_events(
    records: list[Record],
    known: dict[str, tuple[type, int]],
    decode: Callable[[bytes], Any],
    uuids: dict[bytes, Any],
    id_of: Callable[[bytes], Any],
    /,
) -> tuple[list[Any], list[int]]: ...
