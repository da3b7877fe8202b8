"""The read-only reader gives the same records, tail and damage whatever its chunk size.

The reader goes through a segment in chunks and carries a transaction that a chunk cuts in two
over to the next chunk, instead of reading its bytes again. These tests build logs byte by byte
(transactions of any size, over one or two segments), tear or damage them anywhere, and compare
reading in small chunks with reading each segment in one piece.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LogCorrupted
from engine.log.framing import (
    FRAME_HEADER_SIZE,
    SEGMENT_PREAMBLE,
    ZERO_HASH,
    Record,
    SegmentHeader,
    digest,
    encode_payload,
    encode_segment_header,
    frame,
)
from engine.log.reader import ReadOnlyLog
from engine.log.scan import Tail, scan

WHOLE = 1 << 30  # a chunk larger than any segment here: each segment read in one piece


@dataclass
class Built:
    segments: list[bytes]
    records: list[Record]


def build(transactions: list[list[bytes]], roll_after: int) -> Built:
    """A sound log of these transactions (event states), rolled over after ``roll_after``."""
    segments: list[bytes] = []
    records: list[Record] = []
    data = bytearray()
    prev = ZERO_HASH
    for number, txns in enumerate([transactions[:roll_after], transactions[roll_after:]], 1):
        if number == 2 and not txns:
            break
        header = SegmentHeader(1, number, len(records) + 1, prev, 0, "builder")
        data = bytearray(encode_segment_header(header))
        for txn in txns:
            for i, state in enumerate(txn):
                seq = len(records) + 1
                key = uuid.UUID(int=seq % 3).bytes if seq % 2 else f"agg-{seq % 3}"
                record = Record(seq, prev, "host", seq, i == len(txn) - 1, key, 1, "t", state)
                framed = frame(encode_payload(record))
                data += framed
                prev = digest(framed)
                records.append(record)
        segments.append(bytes(data))
    return Built(segments, records)


@dataclass
class Outcome:
    records: list[Record]
    batches_end_transactions: bool
    tail: tuple[int, int, int] | None
    damage: tuple[int, int] | None


def read(segments: list[bytes], chunk: int, start: int = 1, *, read_ahead: bool = True) -> Outcome:
    with tempfile.TemporaryDirectory() as directory:
        for number, data in enumerate(segments, 1):
            with open(os.path.join(directory, f"segment-{number:010d}.log"), "wb") as f:
                f.write(data)
        log = ReadOnlyLog(directory, chunk=chunk, read_ahead=read_ahead)
        batches: list[list[Record]] = []
        damage = None
        try:
            batches.extend(log.batches(start))
        except LogCorrupted as e:
            damage = (e.segment, e.offset)
        tail = None if log.tail is None else (log.tail.segment, log.tail.end, log.tail.size)
        return Outcome(
            [record for batch in batches for record in batch],
            all(batch and batch[-1].txn_last for batch in batches),
            tail,
            damage,
        )


transactions = st.lists(
    st.lists(st.binary(max_size=400), min_size=1, max_size=5), min_size=1, max_size=8
)


@settings(max_examples=150, deadline=None)
@given(transactions, st.integers(0, 8), st.integers(1, 3000), st.integers(1, 50))
def test_a_sound_log_reads_alike_in_any_chunk_size_from_any_record(
    txns: list[list[bytes]], roll_after: int, chunk: int, start: int
) -> None:
    built = build(txns, roll_after)

    got = read(built.segments, chunk)
    later = read(built.segments, chunk, start)

    assert got.records == built.records
    assert got.batches_end_transactions
    end = len(built.segments[-1])
    assert got.tail == (len(built.segments), end, end) and got.damage is None
    assert later.records == [r for r in built.records if r.seq >= start]


@settings(max_examples=150, deadline=None)
@given(transactions, st.integers(1, 3000), st.data())
def test_a_tail_torn_anywhere_reads_alike_in_any_chunk_size(
    txns: list[list[bytes]], chunk: int, data: st.DataObject
) -> None:
    built = build(txns, len(txns))
    segment = built.segments[0]
    start = records_start(segment)
    cut = data.draw(st.integers(start, len(segment) - 1), label="cut")
    torn = [segment[:cut]]

    got = read(torn, chunk)

    ends = [start + end for end in _frame_ends(segment[start:])]
    whole = [i + 1 for i, r in enumerate(built.records) if r.txn_last and ends[i] <= cut]
    kept = whole[-1] if whole else 0
    assert got.records == built.records[:kept]
    assert got.tail == (1, ends[kept - 1] if kept else start, cut) and got.damage is None
    assert got == read(torn, WHOLE)


@settings(max_examples=200, deadline=None)
@given(transactions, st.integers(0, 8), st.integers(1, 3000), st.data())
def test_a_byte_flipped_anywhere_reads_alike_in_any_chunk_size(
    txns: list[list[bytes]], roll_after: int, chunk: int, data: st.DataObject
) -> None:
    built = build(txns, roll_after)
    with_records = [n for n, data in enumerate(built.segments) if len(data) > records_start(data)]
    number = data.draw(st.sampled_from(with_records), label="segment")
    segment = bytearray(built.segments[number])
    at = data.draw(st.integers(records_start(segment), len(segment) - 1), label="offset")
    segment[at] ^= data.draw(st.integers(1, 255), label="xor")
    damaged = [*built.segments[:number], bytes(segment), *built.segments[number + 1 :]]

    got, whole = read(damaged, chunk), read(damaged, WHOLE)

    assert got == whole
    assert got.records == built.records[: len(got.records)]


def test_a_transaction_cut_by_the_end_of_a_buffer_is_held_back_with_the_chain_after_it() -> None:
    built = build([[b"a"], [b"b", b"c", b"d"]], 2)
    header_size = records_start(built.segments[0])
    body = built.segments[0][header_size:]
    frames = list(_frame_ends(body))
    buf = body[: frames[2]]  # the first transaction and two frames of the second

    result = scan(buf, header_size, 1, 1, ZERO_HASH)

    assert result.records == built.records[:1] and result.tail is Tail.TORN
    assert result.end == header_size + frames[0]
    assert result.pending.records == built.records[1:3]
    assert result.pending.end == header_size + frames[2]
    assert result.pending.next_seq == 4
    assert result.pending.last_hash == built.records[3].prev_hash
    rest = scan(
        body[frames[2] :], result.pending.end, 1, result.pending.next_seq, result.pending.last_hash
    )
    assert rest.records == built.records[3:] and rest.tail is Tail.CLEAN


def test_a_record_that_decodes_to_a_map_is_reported_as_damage() -> None:
    fields = ["seq", "prev", "host", "time", "last", "id", "version", "topic", "state"]
    buf = frame(msgpack.packb(dict.fromkeys(fields, 0)))

    with pytest.raises(LogCorrupted, match="does not decode") as raised:
        scan(buf, 100, 1, 1, ZERO_HASH)

    assert raised.value.offset == 100


def records_start(segment: bytes | bytearray) -> int:
    return SEGMENT_PREAMBLE.size + int(SEGMENT_PREAMBLE.unpack_from(segment)[3])


def _frame_ends(body: bytes) -> Iterator[int]:
    pos = 0
    while pos < len(body):
        pos += FRAME_HEADER_SIZE + int.from_bytes(body[pos : pos + 4], "big")
        yield pos


def test_a_broken_chain_is_reported_whatever_the_aggregate_id_is() -> None:
    # An id the writer never makes, which readers still take (a msgpack nil).
    record = Record(1, digest(b"not the chain"), "host", 0, True, None, 1, "t", b"")  # type: ignore[arg-type]
    buf = frame(encode_payload(record))

    with pytest.raises(LogCorrupted, match="hash chain broken") as raised:
        scan(buf, 100, 1, 1, ZERO_HASH)

    assert raised.value.offset == 100
