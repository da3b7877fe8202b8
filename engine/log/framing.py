"""Bytes on disk: the segment header and the record frame (log format version 1).

Pure functions over ``bytes``; no files here. See docs/adr/0002-operation-log-format.md.

Segment header::

    b"STRATLOG" | u16 version | u16 reserved (0) | u32 body length | u32 crc32(body) | body

The body is a msgpack map (``format``, ``version``, ``segment``, ``first_seq``, ``prev_hash``,
``created_ns``, ``host_id``). The fixed preamble lets any later version tell "not a Strata log"
from "a log of a version I do not know" without decoding the body.

Record frame::

    u32 payload length | u32 crc32(payload) | u32 crc32(first 8 bytes) | payload

The header checksum guards the length: a flipped length bit must read as damage, never as a
frame that runs past the end of the file (which would look like a torn tail and be cut off).
The payload is a msgpack array, field order fixed by the version::

    [seq, prev_hash, host_id, time_ns, txn_last, originator_id, originator_version, topic, state]

``prev_hash`` is BLAKE2b-256 of the previous record's whole frame, header and payload (the
previous segment's last one for a segment's first record, 32 zero bytes for the very first
record), so the chain covers every byte of history but the last frame, which its checksums
guard. ``txn_last`` is false on every record of a multi-event transaction but the last, so a
reader never shows half of one.

Imports: msgpack; the standard library.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import msgpack

MAGIC = b"STRATLOG"
FORMAT_NAME = "strata-log"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

SEGMENT_PREAMBLE = struct.Struct(">8sHHII")  # magic, version, reserved, body length, body crc
FRAME_HEADER = struct.Struct(">III")  # payload length, payload crc, crc of the first 8 bytes
FRAME_HEADER_SIZE = FRAME_HEADER.size
# A frame header in two parts, as it is built: length and payload crc, then the crc of those.
LENGTH_AND_CRC = struct.Struct(">II")
HEADER_CRC = struct.Struct(">I")
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)
# A record larger than this is refused on write and read as damage: no event is this big, and
# a bound keeps a damaged length from making a reader allocate gigabytes.
MAX_PAYLOAD = 16 * 2**20


class Record(NamedTuple):
    """One event as the log holds it.

    A NamedTuple rather than a frozen dataclass: replay builds millions of them, and a tuple is
    built in one C call where a frozen dataclass pays a ``setattr`` per field.
    """

    seq: int
    prev_hash: bytes
    host_id: str
    time_ns: int
    txn_last: bool
    originator_key: bytes | str  # see key_of(); bytes hash in C, UUIDs in Python
    originator_version: int
    topic: str
    state: bytes

    @property
    def originator_id(self) -> uuid.UUID | str:
        return id_of(self.originator_key)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    version: int
    segment: int
    first_seq: int
    prev_hash: bytes
    created_ns: int
    host_id: str


# A fresh BLAKE2b-256 hasher: copying a prepared one skips the constructor's parsing of its
# keyword parameters, which costs more than hashing a small frame (the chain hashes every one).
new_hasher = hashlib.blake2b(digest_size=HASH_SIZE).copy


def digest(payload: bytes) -> bytes:
    hasher = new_hasher()
    hasher.update(payload)
    return hasher.digest()


def crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data)  # unsigned in Python 3


# An aggregate's id recurs in every one of its events; building its UUID once keeps reads fast.
_uuids: dict[bytes, uuid.UUID] = {}
_UUID_CACHE_MAX = 1 << 20


def key_of(originator_id: uuid.UUID | str) -> bytes | str:
    """How the log stores an aggregate id: a UUID as its 16 bytes, any other id as a string."""
    return originator_id.bytes if isinstance(originator_id, uuid.UUID) else originator_id


def id_of(key: bytes | str) -> uuid.UUID | str:
    if isinstance(key, str):
        return key
    found = _uuids.get(key)
    if found is None:
        found = uuid.UUID(bytes=key)
        if len(_uuids) >= _UUID_CACHE_MAX:
            _uuids.clear()
        _uuids[key] = found
    return found


def new_packer() -> msgpack.Packer:
    """A Packer for :func:`encode_payload`; it keeps a buffer, so one thread at a time."""
    return msgpack.Packer(use_bin_type=True)


def encode_payload(record: Record, packer: msgpack.Packer | None = None) -> bytes:
    """The record's payload; pass a :func:`new_packer` that only this thread uses to save
    building one per record (a third of the cost)."""
    packed: bytes = (packer or new_packer()).pack(
        [
            record.seq,
            record.prev_hash,
            record.host_id,
            record.time_ns,
            record.txn_last,
            record.originator_key,
            record.originator_version,
            record.topic,
            record.state,
        ]
    )
    return packed


_new_record = tuple.__new__


def decode_payload(payload: bytes | memoryview) -> Record:
    """Decode a payload whose checksum already matched; raises ValueError on a bad shape."""
    fields = msgpack.unpackb(payload, raw=False, use_list=False)
    if type(fields) is not tuple or len(fields) != 9:
        raise ValueError("record payload is not a version-1 record array")
    return _new_record(Record, fields)


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = LENGTH_AND_CRC.pack(len(payload), zlib.crc32(payload))
    return b"".join((head, HEADER_CRC.pack(zlib.crc32(head)), payload))


def encode_segment_header(header: SegmentHeader) -> bytes:
    body: bytes = msgpack.packb(
        {
            "format": FORMAT_NAME,
            "version": header.version,
            "segment": header.segment,
            "first_seq": header.first_seq,
            "prev_hash": header.prev_hash,
            "created_ns": header.created_ns,
            "host_id": header.host_id,
        },
        use_bin_type=True,
    )
    return SEGMENT_PREAMBLE.pack(MAGIC, header.version, 0, len(body), crc(body)) + body
