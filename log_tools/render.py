"""How a record and a time look in the tools' output, for people and for JSON.

JSON carries every byte string as lowercase hex, so an auditor can compare ``prev_hash`` with a
BLAKE2b digest computed elsewhere without decoding anything.

Imports: ``engine.log``, ``engine.opaque``, msgpack; the standard library.
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import msgpack

from engine.log.framing import Record
from engine.opaque import EXT_CODE, Opaque, json_ready

PREVIEW_CHARS = 72


def iso_time(time_ns: int) -> str:
    """UTC with nanoseconds: records from one host can be microseconds apart."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def printable(text: str) -> str:
    # Host ids and topics come from the log: a newline in one must not forge a line of output.
    return text if text.isprintable() else repr(text)


def state_preview(state: bytes) -> str:
    """The event's state decoded from msgpack and shortened, or just its size if it is opaque."""
    try:
        value = msgpack.unpackb(state, raw=False, strict_map_key=False, ext_hook=_ext)
    except (ValueError, TypeError):  # not msgpack, or a map key Python cannot hash
        return f"<{len(state)} bytes>"
    text = repr(value)  # user data as Opaque(value): an Opaque's repr shows what it holds
    if len(text) > PREVIEW_CHARS:
        text = text[: PREVIEW_CHARS - 1] + "…"
    return f"<{len(state)} bytes> {text}"


def _ext(code: int, data: bytes) -> Any:
    return Opaque(data) if code == EXT_CODE else msgpack.ExtType(code, data)


def record_line(record: Record) -> str:
    return "  ".join(
        (
            f"{record.seq:>8}",
            iso_time(record.time_ns),
            printable(record.host_id),
            printable(str(record.originator_id)),
            f"v{record.originator_version}",
            printable(record.topic),
            state_preview(record.state),
        )
    )


def record_json(record: Record) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "prev_hash": record.prev_hash.hex(),
        "host_id": record.host_id,
        "time_ns": record.time_ns,
        "time": iso_time(record.time_ns),
        "txn_last": record.txn_last,
        "originator_id": str(record.originator_id),
        # A string id may look like a UUID; the log tells them apart, so the dump does too.
        "originator_type": "uuid" if isinstance(record.originator_id, uuid.UUID) else "str",
        "originator_version": record.originator_version,
        "topic": record.topic,
        "state": record.state.hex(),
    }


def plain(value: Any) -> Any:
    """A value from the log as JSON can hold it: bytes as hex, anything else unknown as text."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Opaque):  # user data: the caller's value, which JSON then shows
        return json_ready(value.value)
    return str(value)


def to_json(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(json_ready(value), indent=indent, default=plain)  # bytes keys: user data


def short(text: str, width: int) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


# Every event has these; the rest of its fields are what it says happened.
_COMMON_FIELDS = ("originator_id", "originator_version", "timestamp", "host_id")


def event_fields(event: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(event).items() if k not in _COMMON_FIELDS}
