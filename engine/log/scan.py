"""Reading records out of a segment's bytes, and telling a torn tail from damage.

Pure: takes bytes, returns records or raises :class:`LogCorrupted`. The rule for the end of a
segment (docs/adr/0002-operation-log-format.md):

* bytes after the last whole transaction that are *torn* -- shorter than a frame header, a frame
  whose checked header promises more bytes than the file has, or a frame whose non-zero bytes
  stop before a sector boundary with only zeros after it (the sectors never reached the disk) --
  are a crash mid-append: never read as events, cut off by the next appender under the lock;
* anything else that does not check out is damage: :class:`LogCorrupted` with segment and offset.

Imports: its own package, ``engine.errors``, msgpack; the standard library.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack

from engine.errors import LogCorrupted
from engine.log.framing import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    MAX_PAYLOAD,
    Record,
    decode_payload,
)
from engine.log.framing import (
    new_hasher as new_frame_hasher,
)

compiled_scan_frames: Callable[..., tuple[int, int, int, bytes, int, int, int, bytes]] | None
try:
    from engine.log._fastscan import scan_frames as compiled_scan_frames
except ImportError:  # built without a C compiler (setup.py): the Python loop reads every frame
    compiled_scan_frames = None

SECTOR = 512
_LENGTH = struct.Struct(">I")

# Which scanner reads the frames of the common shape: "compiled" (engine/log/csrc/fastscan.c)
# or "python". Tests set ``scan_frames`` to None to read every frame with the Python loop.
scan_frames = compiled_scan_frames
SCANNER = "python" if compiled_scan_frames is None else "compiled"


class Tail(enum.Enum):
    CLEAN = "clean"  # the bytes end exactly after a whole transaction
    TORN = "torn"  # a crash left part of an append; cut at ScanResult.end


@dataclass(frozen=True, slots=True)
class Pending:
    """Frames read whole and checked after the last whole transaction, and the chain after them.

    A reader holding only part of a file goes on from ``end`` with these records instead of
    reading their bytes again (a transaction can be larger than what a reader holds at once).
    """

    records: list[Record]
    offsets: list[int]
    end: int
    next_seq: int
    last_hash: bytes


@dataclass(frozen=True, slots=True)
class FrameHashes:
    """The hash of every whole frame of ``buf``, computed ahead (engine/log/read_ahead.py)."""

    buf: bytes
    digests: bytes  # each frame's offset and BLAKE2b-256, as engine/log/csrc/frames.h lays out
    end: int  # just past the last frame whose length fits the buffer


@dataclass(slots=True)
class ScanResult:
    records: list[Record]
    offsets: list[int]  # absolute segment offset of each record's frame
    end: int  # absolute offset just past the last whole transaction
    next_seq: int
    last_hash: bytes
    tail: Tail
    pending: Pending


def scan(
    buf: bytes,
    base: int,
    segment: int,
    next_seq: int,
    last_hash: bytes,
    hashes: FrameHashes | None = None,
) -> ScanResult:
    """Decode the frames in ``buf`` (which starts at segment offset ``base``).

    ``next_seq`` and ``last_hash`` are what the chain expects next. Only whole transactions are
    returned: records of a transaction whose last record is missing are held back (in
    ``pending``, for a caller that reads on), and their bytes count as torn when the buffer
    ends there. ``hashes``, from :func:`engine.log.read_ahead.hash_frames` of this very
    ``buf``, saves hashing its frames again; the result is the same with or without it.
    """
    digests = hashes.digests if hashes is not None and hashes.buf is buf else None
    with gc_paused():
        return _scan(buf, base, segment, next_seq, last_hash, digests)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    # Replay allocates a tuple per record and no cycles; letting the collector walk the growing
    # heap every few hundred records costs a third of replay's time.
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _scan(
    buf: bytes,
    base: int,
    segment: int,
    next_seq: int,
    last_hash: bytes,
    digests: bytes | None = None,
) -> ScanResult:
    # The fast path reads no checksum: each record's prev_hash (BLAKE2b of the whole previous
    # frame) vouches for every byte before it. Checksums are read for the last frame, which
    # nothing vouches for, and when something does not add up, to tell which frame is damaged.
    size = len(buf)
    records: list[Record] = []
    offsets: list[int] = []
    committed = 0  # records up to here belong to whole transactions
    end = base
    pos = 0
    last = -1  # buffer position of the previous frame
    chain_seq, chain_hash = next_seq, last_hash
    good_seq, good_hash = next_seq, last_hash
    # Local names: this loop runs once per record of every replay.
    unpack_length = _LENGTH.unpack_from
    unpackb, new = msgpack.unpackb, tuple.__new__
    new_hasher = new_frame_hasher  # hashing is nearly half of replay's time
    fast = scan_frames
    while pos < size:
        if fast is not None:
            # The frames of the common shape, read in C exactly as below at half the cost
            # (ADR 0008). It stops before any frame it is not sure of, which this loop reads.
            pos, last, chain_seq, chain_hash, committed, end, good_seq, good_hash = fast(
                buf, pos, base, Record, records, offsets, last, chain_seq, chain_hash,
                committed, end, good_seq, good_hash, digests,
            )  # fmt: skip
            if pos == size:
                continue  # all of it read: the loop ends, as when it runs out below
        if size - pos < FRAME_HEADER_SIZE:
            break
        (length,) = unpack_length(buf, pos)
        stop = pos + FRAME_HEADER_SIZE + length
        if stop > size or length > MAX_PAYLOAD:
            break
        try:
            fields = unpackb(buf[pos + FRAME_HEADER_SIZE : stop], raw=False, use_list=False)
            # Plain tuple indexing: a NamedTuple's attribute access costs more, once per record.
            if len(fields) != 9 or fields[0] != chain_seq or fields[1] != chain_hash:
                break
            if type(fields[5]) is bytes and len(fields[5]) != 16:
                break  # an aggregate id is a string or a UUID's 16 bytes
        # msgpack's errors derive from ValueError; LookupError: a map where an array belongs
        except (ValueError, TypeError, LookupError):
            break
        records.append(new(Record, fields))
        offsets.append(base + pos)
        chain_seq += 1
        hasher = new_hasher()
        hasher.update(buf[pos:stop])
        chain_hash = hasher.digest()
        last = pos
        pos = stop
        if fields[4]:  # txn_last
            committed = len(records)
            end = base + pos
            good_seq, good_hash = chain_seq, chain_hash
    else:
        if last >= 0 and not _frame_intact(buf, last):
            # The final frame has no successor to vouch for it: its own checksums decide.
            if not _torn(buf, base, last, size):
                raise LogCorrupted("record checksum mismatch", segment=segment, offset=base + last)
            shorter = _scan(buf[:last], base, segment, next_seq, last_hash)
            shorter.tail = Tail.TORN
            return shorter
        chain = (chain_seq, chain_hash)
        torn = committed < len(records)
        return _finish(
            records, offsets, committed, end, (good_seq, good_hash), base + pos, chain, torn=torn
        )
    # Something at ``pos`` does not add up: find the damaged frame, or see a torn tail.
    if last >= 0 and not _frame_intact(buf, last):
        raise LogCorrupted("record checksum mismatch", segment=segment, offset=base + last)
    problem = _frame_problem(buf, base, pos)
    if problem is None:
        chain = (chain_seq, chain_hash)
        return _finish(
            records, offsets, committed, end, (good_seq, good_hash), base + pos, chain, torn=True
        )
    raise LogCorrupted(
        problem or _what_broke(buf, pos, chain_seq), segment=segment, offset=base + pos
    )


def _frame_intact(buf: bytes, pos: int) -> bool:
    """Whether the frame at ``pos`` passes both of its checksums."""
    length, payload_crc, header_crc = FRAME_HEADER.unpack_from(buf, pos)
    start = pos + FRAME_HEADER_SIZE
    return bool(
        zlib.crc32(buf[pos : pos + 8]) == header_crc
        and length <= MAX_PAYLOAD
        and start + length <= len(buf)
        and zlib.crc32(buf[start : start + length]) == payload_crc
    )


def _frame_problem(buf: bytes, base: int, pos: int) -> str | None:
    """None if the frame at ``pos`` is a torn tail, "" if its checksums pass, else the damage."""
    if len(buf) - pos < FRAME_HEADER_SIZE:
        return None
    length, payload_crc, header_crc = FRAME_HEADER.unpack_from(buf, pos)
    if zlib.crc32(buf[pos : pos + 8]) != header_crc or length > MAX_PAYLOAD:
        return None if _torn(buf, base, pos, None) else "record header checksum mismatch"
    stop = pos + FRAME_HEADER_SIZE + length
    if stop > len(buf):
        return None  # a checked header promising more bytes than were written
    if zlib.crc32(buf[pos + FRAME_HEADER_SIZE : stop]) != payload_crc:
        return None if _torn(buf, base, pos, stop) else "record checksum mismatch"
    return ""


def _what_broke(buf: bytes, pos: int, expected_seq: int) -> str:
    """Explain a frame whose checksums pass but which does not continue the chain."""
    length = _LENGTH.unpack_from(buf, pos)[0]
    try:
        record = decode_payload(buf[pos + FRAME_HEADER_SIZE : pos + FRAME_HEADER_SIZE + length])
    except (ValueError, TypeError) as e:
        return f"record checksums match but the record does not decode ({e})"
    if record.seq != expected_seq:
        return f"sequence {record.seq} where {expected_seq} was expected"
    if type(record.originator_key) is bytes and len(record.originator_key) != 16:
        return "record's aggregate id is neither a string nor a UUID"
    return (
        f"hash chain broken at sequence {record.seq}: the record before it was changed after "
        "it was written"
    )


def _finish(
    records: list[Record],
    offsets: list[int],
    committed: int,
    end: int,
    good: tuple[int, bytes],
    read_to: int,
    chain: tuple[int, bytes],
    *,
    torn: bool,
) -> ScanResult:
    """Split the records read at the last whole transaction (``committed`` of them).

    ``good`` is the chain (next sequence, last hash) after that transaction, which ends at
    ``end``; ``chain`` is the chain after every frame read, which ends at ``read_to``.
    """
    pending = Pending(records[committed:], offsets[committed:], read_to, *chain)
    del records[committed:]
    del offsets[committed:]
    return ScanResult(records, offsets, end, *good, Tail.TORN if torn else Tail.CLEAN, pending)


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
