"""Reading records out of a segment's bytes, and telling a torn tail from damage.

Pure: takes bytes, returns records or raises :class:`LogCorrupted`. The rule for the end of a
segment (docs/adr/0002-operation-log-format.md):

* bytes after the last whole transaction that are *torn* -- shorter than a frame header, a frame
  whose checked header promises more bytes than the file has, or a frame whose non-zero bytes
  stop before a sector boundary with only zeros after it (the sectors never reached the disk) --
  are a crash mid-append: never read as events, cut off by the next appender under the lock;
* anything else that does not check out is damage: :class:`LogCorrupted` with segment and offset.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.errors import LogCorrupted
from engine.log.framing import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    MAX_PAYLOAD,
    Record,
    crc,
    decode_payload,
    digest,
)

SECTOR = 512


class Tail(enum.Enum):
    CLEAN = "clean"  # the bytes end exactly after a whole transaction
    TORN = "torn"  # a crash left part of an append; cut at ScanResult.end


@dataclass(slots=True)
class ScanResult:
    records: list[Record]
    offsets: list[int]  # absolute segment offset of each record's frame
    end: int  # absolute offset just past the last whole transaction
    next_seq: int
    last_hash: bytes
    tail: Tail


def scan(
    buf: bytes,
    base: int,
    segment: int,
    next_seq: int,
    last_hash: bytes,
) -> ScanResult:
    """Decode the frames in ``buf`` (which starts at segment offset ``base``).

    ``next_seq`` and ``last_hash`` are what the chain expects next. Only whole transactions are
    returned: records of a transaction whose last record is missing are held back, and their
    bytes count as torn when the buffer ends there.
    """
    view = memoryview(buf)
    size = len(buf)
    records: list[Record] = []
    offsets: list[int] = []
    committed = 0  # records up to here belong to whole transactions
    end = base
    pos = 0
    chain_seq, chain_hash = next_seq, last_hash
    good_seq, good_hash = next_seq, last_hash
    unpack = FRAME_HEADER.unpack_from
    while pos < size:
        if size - pos < FRAME_HEADER_SIZE:
            return _finish(records, offsets, committed, end, good_seq, good_hash, torn=True)
        length, payload_crc, header_crc = unpack(buf, pos)
        if crc(view[pos : pos + 8]) != header_crc or length > MAX_PAYLOAD:
            if _torn(buf, base, pos, None):
                return _finish(records, offsets, committed, end, good_seq, good_hash, torn=True)
            raise LogCorrupted(
                "record header checksum mismatch", segment=segment, offset=base + pos
            )
        stop = pos + FRAME_HEADER_SIZE + length
        if stop > size:
            return _finish(records, offsets, committed, end, good_seq, good_hash, torn=True)
        payload = buf[pos + FRAME_HEADER_SIZE : stop]
        if crc(payload) != payload_crc:
            if _torn(buf, base, pos, stop):
                return _finish(records, offsets, committed, end, good_seq, good_hash, torn=True)
            raise LogCorrupted("record checksum mismatch", segment=segment, offset=base + pos)
        try:
            record = decode_payload(payload)
        except ValueError as e:  # msgpack's errors derive from ValueError
            raise LogCorrupted(
                f"record does not decode ({e})", segment=segment, offset=base + pos
            ) from e
        if record.seq != chain_seq:
            raise LogCorrupted(
                f"sequence {record.seq} where {chain_seq} was expected",
                segment=segment,
                offset=base + pos,
            )
        if record.prev_hash != chain_hash:
            raise LogCorrupted(
                f"hash chain broken at sequence {record.seq}", segment=segment, offset=base + pos
            )
        records.append(record)
        offsets.append(base + pos)
        chain_seq += 1
        chain_hash = digest(payload)
        pos = stop
        if record.txn_last:
            committed = len(records)
            end = base + pos
            good_seq, good_hash = chain_seq, chain_hash
    return _finish(
        records, offsets, committed, end, good_seq, good_hash, torn=committed < len(records)
    )


def _finish(
    records: list[Record],
    offsets: list[int],
    committed: int,
    end: int,
    next_seq: int,
    last_hash: bytes,
    *,
    torn: bool,
) -> ScanResult:
    del records[committed:]
    del offsets[committed:]
    return ScanResult(records, offsets, end, next_seq, last_hash, Tail.TORN if torn else Tail.CLEAN)


def _torn(buf: bytes, base: int, pos: int, frame_end: int | None) -> bool:
    """Whether a frame that failed its checks at ``pos`` is a crash's leftover, not damage.

    A crash mid-append leaves whole sectors unwritten (read back as zeros) at the end of the
    file. So the frame is torn when everything from a sector boundary inside it to the end of
    the buffer is zero and its non-zero bytes stop inside this one frame (``frame_end``; for a
    frame whose header is itself bad, inside the header).
    """
    nonzero_end = len(buf.rstrip(b"\0")) if buf[-1:] == b"\0" else len(buf)
    if nonzero_end <= pos:
        return True  # only zeros from the frame on: a file extended but never written
    limit = frame_end if frame_end is not None else pos + FRAME_HEADER_SIZE
    if nonzero_end >= limit:
        return False  # this frame is whole yet wrong, or other bytes follow it
    first_zero_sector = -(-(base + nonzero_end) // SECTOR) * SECTOR  # sectors are file offsets
    return first_zero_sector < base + len(buf)
