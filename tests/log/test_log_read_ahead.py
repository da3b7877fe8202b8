"""Reading ahead in a thread changes when bytes are read and hashed, never what a reader sees.

A segment of more than one chunk is read and hashed ahead by a thread while the consumer builds
and folds records (engine/log/reader.py). These tests read the same logs with and without it:
the same batches, the same tail, the same damage raised after the same records; and they check
that no thread or file descriptor outlives a reader, however early its consumer stops.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LogCorrupted
from engine.log import read_ahead
from engine.log.framing import Record
from engine.log.reader import ReadOnlyLog
from tests.log.test_log_reader_chunks import build, records_start, transactions

needs_compiled = pytest.mark.skipif(
    read_ahead.compiled_read_frames is None,
    reason="engine/log/_readahead is not built (or --scanner=python)",
)

Read = tuple[int, int, bytes, bytes, int]
Seen = tuple[list[list[Record]], tuple[int, int, int] | None, object]


def write(directory: Path, segments: list[bytes]) -> str:
    directory.mkdir(exist_ok=True)
    for number, data in enumerate(segments, 1):
        (directory / f"segment-{number:010d}.log").write_bytes(data)
    return str(directory)


def seen(directory: str, chunk: int, *, read_ahead: bool, start: int = 1) -> Seen:
    """The batches as they came, the tail, and what was raised after them."""
    log = ReadOnlyLog(directory, chunk=chunk, read_ahead=read_ahead)
    batches: list[list[Record]] = []
    raised: object = None
    try:
        for batch in log.batches(start):
            batches.append(batch)
    except LogCorrupted as e:
        raised = ("damage", str(e), vars(e))
    except OSError as e:
        raised = ("os", e.errno)
    tail = None if log.tail is None else (log.tail.segment, log.tail.end, log.tail.size)
    return batches, tail, raised


def same_with_and_without(directory: str, chunk: int, start: int = 1) -> Seen:
    alone = seen(directory, chunk, read_ahead=False, start=start)
    assert seen(directory, chunk, read_ahead=True, start=start) == alone
    assert not read_ahead_threads()
    return alone


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "strata-log-read-ahead"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


chunks = st.integers(64, 1500)  # small enough that segments take several chunks


@needs_compiled
@settings(max_examples=100, deadline=None)
@given(transactions, st.integers(0, 8), chunks, st.integers(1, 50))
def test_a_sound_log_reads_alike_with_and_without_reading_ahead(
    tmp_path_factory: pytest.TempPathFactory,
    txns: list[list[bytes]],
    roll_after: int,
    chunk: int,
    start: int,
) -> None:
    built = build(txns, roll_after)
    directory = write(tmp_path_factory.mktemp("log"), built.segments)

    batches, _, raised = same_with_and_without(directory, chunk, start)

    assert raised is None
    assert [r for b in batches for r in b] == [r for r in built.records if r.seq >= start]


@needs_compiled
@settings(max_examples=100, deadline=None)
@given(transactions, st.integers(0, 8), chunks, st.data())
def test_a_torn_log_reads_alike_with_and_without_reading_ahead(
    tmp_path_factory: pytest.TempPathFactory,
    txns: list[list[bytes]],
    roll_after: int,
    chunk: int,
    data: st.DataObject,
) -> None:
    built = build(txns, roll_after)
    last = built.segments[-1]
    cut = data.draw(st.integers(records_start(last), len(last)), label="cut")
    zeros = data.draw(st.integers(0, 1024), label="zeros after the cut")
    torn = [*built.segments[:-1], last[:cut] + bytes(zeros)]

    same_with_and_without(write(tmp_path_factory.mktemp("log"), torn), chunk)


@needs_compiled
@settings(max_examples=150, deadline=None)
@given(transactions, st.integers(0, 8), chunks, st.data())
def test_a_damaged_log_reads_alike_with_and_without_reading_ahead(
    tmp_path_factory: pytest.TempPathFactory,
    txns: list[list[bytes]],
    roll_after: int,
    chunk: int,
    data: st.DataObject,
) -> None:
    built = build(txns, roll_after)
    with_records = [n for n, seg in enumerate(built.segments) if len(seg) > records_start(seg)]
    number = data.draw(st.sampled_from(with_records), label="segment")
    segment = bytearray(built.segments[number])
    at = data.draw(st.integers(records_start(bytes(segment)), len(segment) - 1), label="offset")
    segment[at] ^= data.draw(st.integers(1, 255), label="xor")
    damaged = [*built.segments[:number], bytes(segment), *built.segments[number + 1 :]]

    same_with_and_without(write(tmp_path_factory.mktemp("log"), damaged), chunk)


def big_log(tmp_path: Path) -> tuple[str, list[Record]]:
    built = build([[bytes(300)] * 5 for _ in range(200)], 100)  # two segments of some 180 kB
    return write(tmp_path / "log", built.segments), built.records


@needs_compiled
def test_a_segment_of_several_chunks_is_read_ahead_and_a_single_chunk_is_not(
    tmp_path: Path,
) -> None:
    directory, records = big_log(tmp_path)

    with_threads = [
        bool(read_ahead_threads()) for _ in ReadOnlyLog(directory, read_ahead=True).records()
    ]
    in_chunks = [
        bool(read_ahead_threads())
        for _ in ReadOnlyLog(directory, chunk=4096, read_ahead=True).records()
    ]

    assert len(with_threads) == len(records) and not any(with_threads)
    assert len(in_chunks) == len(records) and any(in_chunks)
    assert not read_ahead_threads()


@needs_compiled
@pytest.mark.parametrize("stop_after", [0, 1, 700])
@pytest.mark.parametrize("how", ["records", "batches"])
def test_a_reader_closed_early_leaves_no_thread_and_no_open_file(
    tmp_path: Path, stop_after: int, how: str
) -> None:
    directory, _ = big_log(tmp_path)
    threads, fds = threading.active_count(), open_fds()
    log = ReadOnlyLog(directory, chunk=4096, read_ahead=True)
    reader = log.records() if how == "records" else log.batches()

    for taken, _ in enumerate(reader):
        if taken == stop_after:
            break
    reader.close()

    assert not read_ahead_threads()
    assert threading.active_count() == threads
    assert open_fds() == fds


@needs_compiled
@pytest.mark.parametrize("failing_at", [0, 1, 5, 30])
def test_a_read_that_fails_ahead_fails_after_the_same_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_at: int
) -> None:
    directory, _ = big_log(tmp_path)
    bad = 4096 * failing_at  # a bad disk block from here on, say
    real_pread, real_read_frames = os.pread, read_ahead.compiled_read_frames
    assert real_read_frames is not None

    def pread(fd: int, size: int, offset: int) -> bytes:
        if offset > bad:
            raise OSError(errno.EIO, "input/output error")
        return real_pread(fd, size, offset)

    def read_frames(fd: int, pos: int, size: int, chunk: int, count: int) -> list[Read]:
        if pos > bad:
            raise OSError(errno.EIO, "input/output error")
        return [read for read in real_read_frames(fd, pos, size, chunk, count) if read[0] <= bad]

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(read_ahead, "compiled_read_frames", read_frames)
    _, tail, raised = same_with_and_without(directory, 4096)

    assert raised == ("os", errno.EIO) and tail is None


@needs_compiled
@pytest.mark.parametrize("chunk", [100, 4096, 50_000, 1 << 20])
def test_reading_ahead_reads_and_hashes_chunks_as_the_consumer_would(
    tmp_path: Path, chunk: int
) -> None:
    directory, _ = big_log(tmp_path)
    path = os.path.join(directory, "segment-0000000001.log")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = records_start(Path(path).read_bytes())
        read_frames, hash_frames = read_ahead.compiled_read_frames, read_ahead.compiled_hash_frames
        assert read_frames is not None and hash_frames is not None
        got = read_frames(fd, pos, size, chunk, 8)
        expected = []
        for _ in range(8):
            asked = min(chunk, size - pos)
            buf = os.pread(fd, asked, pos)
            digests, end = hash_frames(buf)
            expected.append((pos, asked, buf, digests, end))
            pos += end
            if end == 0 or pos >= size:
                break
    finally:
        os.close(fd)
    assert got == expected
