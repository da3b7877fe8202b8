"""The compiled scanner reads exactly what the Python scanner reads, only faster.

``engine/log/csrc/fastscan.c`` reads the frames of the one common shape and leaves every other
frame to the Python loop of ``engine/log/scan.py``, the reference (ADR 0008). These tests build
logs byte by byte, with every msgpack encoding a field can have, shapes the Python loop accepts
that the C code leaves to it, and shapes that are damage; then tear or flip them anywhere, and
check that both scanners give the same records (of the same types), offsets, tail and pending
transaction, or the same damage at the same offset.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import struct
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LogCorrupted
from engine.log import read_ahead
from engine.log import scan as scan_module
from engine.log.framing import ZERO_HASH, Record, digest, encode_payload, frame
from engine.log.read_ahead import hash_frames
from engine.log.scan import SECTOR, scan

compiled = scan_module.compiled_scan_frames
needs_compiled = pytest.mark.skipif(
    compiled is None, reason="engine/log/_fastscan is not built (or --scanner=python)"
)
needs_hashing = pytest.mark.skipif(
    compiled is None or read_ahead.compiled_hash_frames is None,
    reason="engine/log/_fastscan or _readahead is not built (or --scanner=python)",
)
SOURCE = Path(scan_module.__file__).parent / "csrc" / "fastscan.c"


@contextlib.contextmanager
def scanner(name: str) -> Iterator[None]:
    """Scan with "python", "compiled", or "hashed ahead" (compiled, the frames hashed first)."""
    saved = scan_module.scan_frames
    scan_module.scan_frames = None if name == "python" else compiled
    try:
        yield
    finally:
        scan_module.scan_frames = saved


def outcome(buf: bytes, base: int, next_seq: int, last_hash: bytes, name: str) -> object:
    """Everything a caller can see of a scan, types of the values included."""
    with scanner(name):
        try:
            hashes = hash_frames(buf) if name == "hashed ahead" else None
            result = scan(buf, base, 7, next_seq, last_hash, hashes)
        except LogCorrupted as e:
            return ("damage", str(e), vars(e))
        except Exception as e:  # not damage reported as such: a bug, but the same in both
            return ("raised", type(e), str(e))
    return (
        typed(result.records),
        result.offsets,
        result.end,
        result.next_seq,
        result.last_hash,
        result.tail,
        typed(result.pending.records),
        result.pending.offsets,
        result.pending.end,
        result.pending.next_seq,
        result.pending.last_hash,
    )


def typed(records: list[Record]) -> list[tuple[object, ...]]:
    return [(type(r), *((type(v), v) for v in r)) for r in records]


# -- payloads encoded by hand, in every width msgpack allows --------------------------------


def int_encodings(value: int) -> list[bytes]:
    found = []
    if 0 <= value <= 0x7F:
        found.append(bytes([value]))
    if -32 <= value < 0:
        found.append(struct.pack(">b", value))
    for tag, fmt, low, high in [
        (0xCC, ">B", 0, 2**8 - 1),
        (0xCD, ">H", 0, 2**16 - 1),
        (0xCE, ">I", 0, 2**32 - 1),
        (0xCF, ">Q", 0, 2**64 - 1),
        (0xD0, ">b", -(2**7), 2**7 - 1),
        (0xD1, ">h", -(2**15), 2**15 - 1),
        (0xD2, ">i", -(2**31), 2**31 - 1),
        (0xD3, ">q", -(2**63), 2**63 - 1),
    ]:
        if low <= value <= high:
            found.append(bytes([tag]) + struct.pack(fmt, value))
    return found


def raw_encodings(data: bytes, *, is_str: bool) -> list[bytes]:
    n = len(data)
    tags = (0xD9, 0xDA, 0xDB) if is_str else (0xC4, 0xC5, 0xC6)
    found = [bytes([0xA0 | n]) + data] if is_str and n < 32 else []
    if n < 2**8:
        found.append(bytes([tags[0], n]) + data)
    if n < 2**16:
        found.append(bytes([tags[1]]) + struct.pack(">H", n) + data)
    found.append(bytes([tags[2]]) + struct.pack(">I", n) + data)
    return found


@st.composite
def an_int(draw: st.DrawFn, value: int | None = None) -> bytes:
    if value is None:
        value = draw(
            st.one_of(
                st.integers(-40, 300),
                st.integers(-(2**63), 2**64 - 1),
                st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**31, -(2**31) - 1]),
            )
        )
    return draw(st.sampled_from(int_encodings(value)))


@st.composite
def a_str(draw: st.DrawFn, text: str | None = None) -> bytes:
    if text is None:
        text = draw(st.sampled_from(["", "host", "h\u00e9te", "\u4e3b\u673a-1", "x" * 40]))
    return draw(st.sampled_from(raw_encodings(text.encode(), is_str=True)))


@st.composite
def a_bin(draw: st.DrawFn, data: bytes | None = None) -> bytes:
    if data is None:
        data = draw(st.binary(max_size=300))
    return draw(st.sampled_from(raw_encodings(data, is_str=False)))


def packed(value: object) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


# Values the Python loop takes where the common shape has something else, and damage.
odd_values = st.sampled_from(
    [
        packed(None),
        packed(1.5),
        packed(True),
        packed(7),
        packed([1, 2]),
        packed({"a": 1}),
        packed(msgpack.ExtType(1, bytes(16))),
        b"\xa3\xff\xfe\xfd",  # a str that is not UTF-8
        b"\xa2\xed\xa0",  # a lone surrogate, which strict UTF-8 refuses
        b"\xc1",  # never used
        b"\xa5ab",  # a str cut short
    ]
)


@st.composite
def a_field(draw: st.DrawFn, usual: st.SearchStrategy[bytes]) -> bytes:
    return draw(usual if draw(st.integers(0, 12)) else odd_values)


@st.composite
def a_payload(draw: st.DrawFn, seq: int, prev_hash: bytes, txn_last: bool) -> bytes:
    """A record payload: usually of the common shape, sometimes of another one."""
    key = draw(
        st.one_of(
            a_bin(uuid.UUID(int=draw(st.integers(0, 3))).bytes),
            a_str(),
            a_bin(),  # an aggregate id of the wrong length is damage
        )
    )
    last = b"\xc3" if txn_last else b"\xc2"
    fields = [
        draw(a_field(an_int(seq))),
        draw(a_field(a_bin(prev_hash))),
        draw(a_field(a_str())),
        draw(a_field(an_int())),
        draw(a_field(st.just(last))) if draw(st.integers(0, 20)) else packed(int(txn_last)),
        draw(a_field(st.just(key))),
        draw(a_field(an_int())),
        draw(a_field(a_str())),
        draw(a_field(a_bin())),
    ]
    if not draw(st.integers(0, 30)):
        fields = fields[: draw(st.integers(0, 8))] + [packed(0)] * draw(st.integers(0, 2))
    count = len(fields) if draw(st.integers(0, 30)) else draw(st.integers(0, 12))  # may lie
    header = draw(
        st.sampled_from(
            ([bytes([0x90 | count])] if count < 16 else [])
            + [b"\xdc" + struct.pack(">H", count), b"\xdd" + struct.pack(">I", count)]
        )
    )
    trailing = b"" if draw(st.integers(0, 30)) else draw(st.binary(min_size=1, max_size=3))
    return header + b"".join(fields) + trailing


@st.composite
def a_log(draw: st.DrawFn) -> tuple[bytes, int, bytes]:
    """A log's records: (bytes, first sequence, hash before them)."""
    first = draw(st.sampled_from([1, 2**32, 2**63 - 3, 2**64 - 40]))
    start = prev = draw(st.sampled_from([ZERO_HASH, digest(b"before")]))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=8))
    data = bytearray()
    seq = first
    for size in sizes:
        for i in range(size):
            payload = draw(a_payload(seq, prev, i == size - 1))
            framed = frame(payload)
            data += framed
            prev = digest(framed)
            seq += 1
    expected = start if draw(st.integers(0, 20)) else digest(b"another chain")
    return bytes(data), first, expected


def same_either_way(buf: bytes, base: int, next_seq: int, last_hash: bytes) -> None:
    fast = outcome(buf, base, next_seq, last_hash, "compiled")
    ahead = outcome(buf, base, next_seq, last_hash, "hashed ahead")
    pure = outcome(buf, base, next_seq, last_hash, "python")
    assert fast == pure
    assert ahead == pure


def sound_log(count: int, *, first: int = 1, prev: bytes = ZERO_HASH) -> bytes:
    data = bytearray()
    for seq in range(first, first + count):
        key = uuid.UUID(int=seq % 5).bytes if seq % 2 else f"agg-{seq % 3}"
        last = seq % 3 == 0 or seq == first + count - 1
        record = Record(seq, prev, "host", seq * 1000, last, key, seq, "topic", b"s" * (seq % 70))
        framed = frame(encode_payload(record))
        data += framed
        prev = digest(framed)
    return bytes(data)


# -- the tests -----------------------------------------------------------------------------


@needs_compiled
@settings(max_examples=250, deadline=None)
@given(a_log(), st.integers(0, 3 * SECTOR))
def test_both_scanners_read_any_log_alike(log: tuple[bytes, int, bytes], base: int) -> None:
    data, first, prev = log
    same_either_way(data, base, first, prev)


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(a_log(), st.integers(0, 3 * SECTOR), st.data())
def test_both_scanners_read_a_log_torn_anywhere_alike(
    log: tuple[bytes, int, bytes], base: int, data: st.DataObject
) -> None:
    buf, first, prev = log
    cut = data.draw(st.integers(0, len(buf)), label="cut")
    zeros = data.draw(st.integers(0, 2 * SECTOR), label="zeros after the cut")
    same_either_way(buf[:cut] + bytes(zeros), base, first, prev)


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(a_log(), st.integers(0, 3 * SECTOR), st.data())
def test_both_scanners_read_a_log_with_a_byte_flipped_anywhere_alike(
    log: tuple[bytes, int, bytes], base: int, data: st.DataObject
) -> None:
    buf = bytearray(log[0])
    at = data.draw(st.integers(0, len(buf) - 1), label="offset")
    buf[at] ^= data.draw(st.integers(1, 255), label="xor")
    same_either_way(bytes(buf), base, log[1], log[2])


@needs_compiled
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.data())
def test_both_scanners_read_a_sound_log_alike_wherever_it_is_cut_or_flipped(
    count: int, data: st.DataObject
) -> None:
    buf = bytearray(sound_log(count))
    same_either_way(bytes(buf), 4096, 1, ZERO_HASH)
    cut = data.draw(st.integers(0, len(buf)), label="cut")
    same_either_way(bytes(buf[:cut]), 4096, 1, ZERO_HASH)
    at = data.draw(st.integers(0, len(buf) - 1), label="offset")
    buf[at] ^= data.draw(st.integers(1, 255), label="xor")
    same_either_way(bytes(buf), 4096, 1, ZERO_HASH)


@needs_compiled
def test_the_compiled_scanner_reads_every_frame_of_the_common_shape() -> None:
    assert compiled is not None
    buf = sound_log(500, first=10, prev=digest(b"x"))
    records: list[Record] = []
    offsets: list[int] = []

    state = compiled(
        buf, 0, 100, Record, records, offsets, -1, 10, digest(b"x"), 0, 100, 10, digest(b"x")
    )

    expected = scan(buf, 100, 1, 10, digest(b"x"))
    assert state[0] == len(buf) and state[2] == 510
    assert records == expected.records and offsets == expected.offsets
    assert state[4:] == (500, 100 + len(buf), 510, expected.last_hash)


@needs_compiled
def test_the_compiled_scanner_stops_before_a_frame_it_is_not_sure_of() -> None:
    assert compiled is not None
    good = sound_log(3)
    chain = scan(good, 0, 1, 1, ZERO_HASH).last_hash
    record = Record(4, chain, 12, 0, True, b"k" * 16, 1, "t", b"")  # type: ignore[arg-type]  # an int host id
    records: list[Record] = []

    state = compiled(
        good + frame(encode_payload(record)), 0, 0, Record, records, [], -1, 1, ZERO_HASH,
        0, 0, 1, ZERO_HASH,
    )  # fmt: skip

    assert state[0] == len(good) and len(records) == 3


@needs_compiled
@pytest.mark.parametrize("hashed_ahead", [False, True], ids=["scan", "hashed-ahead"])
def test_scanning_a_log_again_and_again_keeps_no_memory(hashed_ahead: bool) -> None:
    buf = sound_log(3000)

    def scan_once() -> None:
        scan(buf, 0, 1, 1, ZERO_HASH, hash_frames(buf) if hashed_ahead else None)

    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(3):
            scan_once()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            scan_once()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 10_000  # a leaked reference per record would be 60 kB a pass


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_the_compiled_blake2b_is_hashlibs(data: bytes) -> None:
    from engine.log._fastscan import blake2b_256

    assert blake2b_256(data) == hashlib.blake2b(data, digest_size=32).digest()


def frames_of(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """Each whole frame's offset and bytes, as far as the frames' lengths fit ``buf``."""
    pos = 0
    while len(buf) - pos >= 12:
        stop = pos + 12 + int.from_bytes(buf[pos : pos + 4], "big")
        if stop > len(buf) or stop - pos - 12 > 16 * 2**20:
            return
        yield pos, buf[pos:stop]
        pos = stop


@needs_hashing
@settings(max_examples=200, deadline=None)
@given(a_log(), st.data())
def test_hashing_ahead_gives_each_whole_frames_blake2b(
    log: tuple[bytes, int, bytes], data: st.DataObject
) -> None:
    buf = bytearray(log[0][: data.draw(st.integers(0, len(log[0])), label="cut")])
    if buf and data.draw(st.booleans(), label="flip"):
        buf[data.draw(st.integers(0, len(buf) - 1), label="offset")] ^= 0xFF

    hashes = hash_frames(bytes(buf))

    assert hashes is not None
    frames = list(frames_of(bytes(buf)))
    entry = struct.Struct("n32s")
    assert list(entry.iter_unpack(hashes.digests)) == [
        (pos, hashlib.blake2b(framed, digest_size=32).digest()) for pos, framed in frames
    ]
    assert hashes.end == (frames[-1][0] + len(frames[-1][1]) if frames else 0)


@needs_hashing
def test_hashes_of_another_buffer_are_not_used() -> None:
    buf = sound_log(50)
    other = hash_frames(sound_log(50, prev=digest(b"elsewhere")))

    assert scan(buf, 0, 1, 1, ZERO_HASH, other) == scan(buf, 0, 1, 1, ZERO_HASH)


@needs_hashing
def test_hashing_ahead_lets_other_threads_run() -> None:
    buf = sound_log(2000) * 150  # some 40 MB: tens of milliseconds of hashing

    def longest_pause() -> tuple[float, float]:
        """How long hashing takes alone, and the longest this thread stalled while another
        thread hashed."""
        started = time.perf_counter()
        hash_frames(buf)
        alone = time.perf_counter() - started
        done = threading.Event()

        def hash_then_say_so() -> None:
            hash_frames(buf)
            done.set()

        worker = threading.Thread(target=hash_then_say_so)
        longest, last = 0.0, time.perf_counter()
        worker.start()
        while not done.is_set():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        worker.join()
        return alone, longest

    # Holding the GIL, the hashing would stop this loop for all of its time, every time; a
    # busy machine may stall it once for other reasons, so one clean try of three is enough.
    tries = [longest_pause() for _ in range(3)]
    assert any(longest < alone / 2 for alone, longest in tries), tries


@pytest.mark.skipif(
    os.environ.get("STRATA_NO_EXTENSIONS") == "1", reason="built without them on purpose"
)
def test_the_compiled_scanner_is_in_use_wherever_its_source_is() -> None:
    # `make` builds it (setup.py); a build that failed quietly (it is optional) shows here.
    assert SOURCE.exists()
    from engine.log import _fastscan, _readahead  # noqa: F401  (ImportError: not built)

    assert scan_module.SCANNER == "compiled"
