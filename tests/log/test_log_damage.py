"""Damaged, torn, tampered and foreign logs: a crash's tail is cut, anything else is reported.

Each test builds a small real log, damages its files the way a crash, a disk or a person would,
and opens it as a new process would.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgpack
import pytest

from engine.errors import LogCorrupted, NotAStrataLog, StrataError, UnsupportedLogVersion
from engine.log import NewEvent, OperationLog, Record
from engine.log.framing import FRAME_HEADER_SIZE, SEGMENT_PREAMBLE, frame
from tests.log import witnesses

SEGMENT_SIZE = 4096


def segment(directory: str | Path, number: int) -> Path:
    return Path(directory, f"segment-{number:010d}.log")


def segment_count(directory: str | Path) -> int:
    return sum(name.startswith("segment-") for name in os.listdir(directory))


@dataclass(frozen=True)
class Frame:
    segment: int
    start: int
    end: int


def layout(directory: str | Path) -> tuple[dict[int, int], list[Frame]]:
    """Where each segment's records begin, and every record frame, read straight off the files."""
    starts, frames = {}, []
    for number in range(1, segment_count(directory) + 1):
        data = segment(directory, number).read_bytes()
        body_length = SEGMENT_PREAMBLE.unpack_from(data)[3]
        pos = starts[number] = SEGMENT_PREAMBLE.size + body_length
        while pos < len(data):
            (length,) = struct.unpack_from(">I", data, pos)
            frames.append(Frame(number, pos, pos + FRAME_HEADER_SIZE + length))
            pos = frames[-1].end
    return starts, frames


def summary(records: list[Record]) -> list[tuple[object, ...]]:
    return [
        (r.seq, r.host_id, r.txn_last, r.originator_id, r.originator_version, r.topic, r.state)
        for r in records
    ]


def append_transactions(log: OperationLog, sizes: list[int], rng: random.Random) -> None:
    for size in sizes:
        aggregate = uuid.UUID(int=rng.getrandbits(128))
        # States end in a non-zero byte: bytes ending in zeros may legitimately read as a torn
        # write (ADR 0002), which is not what these tests are about.
        log.append(
            [
                NewEvent(aggregate, v, "Written", rng.randbytes(rng.randint(20, 200)) + b"\x01")
                for v in range(1, size + 1)
            ]
        )


def read_all(directory: str | Path) -> list[Record]:
    with OperationLog.open(str(directory), "reader") as log:
        return log.read()


def tree(path: Path) -> dict[str, bytes | None]:
    """Every name and byte under the directory ``path``."""
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


# --- a crash's torn tail -----------------------------------------------------------------------


def build_for_truncation(directory: str, last: str) -> tuple[list[tuple[object, ...]], Frame]:
    """A log whose last transaction is described by ``last``; return what precedes it and it."""
    rng = random.Random(7)
    with OperationLog.create(directory, "writer", segment_size=SEGMENT_SIZE) as log:
        append_transactions(log, [1, 2, 1, 3, 1], rng)
        if last == "opens a new segment":
            while os.path.getsize(segment(directory, segment_count(directory))) < SEGMENT_SIZE:
                append_transactions(log, [1], rng)
        before = summary(log.read())
        segments_before = segment_count(directory)
        append_transactions(log, [3 if last == "has three events" else 1], rng)
    assert (segment_count(directory) > segments_before) == (last == "opens a new segment")
    _, frames = layout(directory)
    tail = frames[len(before) :]
    return before, Frame(tail[0].segment, tail[0].start, tail[-1].end)


@pytest.mark.parametrize("last", ["has one event", "has three events", "opens a new segment"])
def test_a_last_transaction_cut_at_any_byte_is_a_torn_tail_that_the_next_append_replaces(
    tmp_path: Path, last: str
) -> None:
    original = str(tmp_path / "original")
    before, txn = build_for_truncation(original, last)
    txn_bytes = segment(original, txn.segment).read_bytes()[txn.start : txn.end]
    for cut in range(txn.start, txn.end):
        copy = tmp_path / f"cut-at-{cut}"
        shutil.copytree(original, copy)
        os.truncate(segment(copy, txn.segment), cut)
        witnesses.forget_from(copy, len(before) + 1)

        with OperationLog.open(str(copy), "survivor", segment_size=SEGMENT_SIZE) as log:
            assert summary(log.read()) == before, f"cut at {cut}"
            assert log.append([NewEvent("after", 1, "Recovered", b"ok")]) == [len(before) + 1]
            assert summary(log.read(len(before) + 1)) == [
                (len(before) + 1, "survivor", True, "after", 1, "Recovered", b"ok")
            ]
        assert summary(read_all(copy))[:-1] == before
        kept = [p.read_bytes() for p in sorted((copy / "torn").glob("*"))]
        assert kept == ([txn_bytes[: cut - txn.start]] if cut > txn.start else []), f"cut {cut}"
        shutil.rmtree(copy)


def test_zeros_after_the_last_record_are_a_torn_tail_that_the_next_append_cuts(
    log_dir: str,
) -> None:
    rng = random.Random(3)
    with OperationLog.create(log_dir, "writer") as log:
        append_transactions(log, [1, 2, 1], rng)
        before = summary(log.read())
    path = segment(log_dir, 1)
    size = os.path.getsize(path)
    with open(path, "ab") as f:  # as a crash leaves a file whose size was updated, not its data
        f.write(bytes(3 * 4096 + 17))

    with OperationLog.open(log_dir, "survivor") as log:
        assert summary(log.read()) == before
        assert log.append([NewEvent("after", 1, "Recovered", b"ok")]) == [5]
    _, frames = layout(log_dir)
    assert os.path.getsize(path) == frames[-1].end > size
    assert frames[-1].start == size
    assert [p.read_bytes() for p in Path(log_dir, "torn").glob("*")] == [bytes(3 * 4096 + 17)]
    assert summary(read_all(log_dir))[:-1] == before


def test_a_last_record_whose_later_sectors_never_reached_the_disk_is_torn(log_dir: str) -> None:
    rng = random.Random(4)
    with OperationLog.create(log_dir, "writer") as log:
        append_transactions(log, [1, 1], rng)
        before = summary(log.read())
        log.append([NewEvent("big", 1, "Written", rng.randbytes(3000) + b"\x01")])
    _, frames = layout(log_dir)
    boundary = (frames[-1].start // 512 + 2) * 512  # the first two sectors made it, no more
    path = segment(log_dir, 1)
    data = path.read_bytes()
    path.write_bytes(data[:boundary] + bytes(len(data) - boundary))
    witnesses.forget_from(log_dir, len(before) + 1)

    with OperationLog.open(log_dir, "survivor") as log:
        assert summary(log.read()) == before
        assert log.append([NewEvent("after", 1, "Recovered", b"ok")]) == [3]
    assert summary(read_all(log_dir))[:-1] == before


def test_zeros_after_a_rolled_over_segment_are_damage(log_dir: str) -> None:
    rng = random.Random(5)
    with OperationLog.create(log_dir, "writer", segment_size=SEGMENT_SIZE) as log:
        append_transactions(log, [1] * 40, rng)
    assert segment_count(log_dir) >= 2
    size = os.path.getsize(segment(log_dir, 1))
    with open(segment(log_dir, 1), "ab") as f:
        f.write(bytes(4096))
    with pytest.raises(LogCorrupted) as caught:
        OperationLog.open(log_dir, "reader")
    assert (caught.value.segment, caught.value.offset) == (1, size)


def test_zeros_after_a_rolled_over_segment_are_damage_to_a_writer_that_had_the_log_open(
    log_dir: str,
) -> None:
    # The same damage as above, met by a process that opened the log before the roll-over: under
    # the lock it must not cut a segment that a later one follows, which would hide the damage.
    rng = random.Random(5)
    with (
        OperationLog.create(log_dir, "early", segment_size=SEGMENT_SIZE) as early,
        OperationLog.open(log_dir, "other", segment_size=SEGMENT_SIZE) as other,
    ):
        append_transactions(other, [1] * 40, rng)
        assert segment_count(log_dir) >= 2
        first = segment(log_dir, 1).read_bytes()
        with open(segment(log_dir, 1), "ab") as f:
            f.write(bytes(4096))
        with pytest.raises(LogCorrupted) as caught:
            early.append([NewEvent("late", 1, "Written", b"x")])
        assert (caught.value.segment, caught.value.offset) == (1, len(first))
    assert segment(log_dir, 1).read_bytes() == first + bytes(4096)


# --- damage to history ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flippable(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Frame], dict[int, int]]:
    """A 50-record log over three segments; its last transaction is a single event."""
    directory = str(tmp_path_factory.mktemp("flips") / "log")
    rng = random.Random(11)
    with OperationLog.create(directory, "writer", segment_size=SEGMENT_SIZE) as log:
        append_transactions(log, [1, 3, 1, 2, 1, 4, 1, 1, 2, 1] * 2 + [1] * 16, rng)
        assert log.last_seq == 50
    assert segment_count(directory) == 3
    starts, frames = layout(directory)
    return directory, frames, starts


def flip_and_open(directory: str, number: int, offset: int, mask: int) -> StrataError | None:
    """Open the log with one byte changed; restore it; return what opening raised."""
    path = segment(directory, number)
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([original ^ mask]))
    try:
        OperationLog.open(directory, "reader").close()
    except StrataError as e:
        return e
    finally:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(bytes([original]))
    return None


def test_every_byte_flipped_in_a_record_before_the_tail_is_reported_at_its_frame(
    flippable: tuple[str, list[Frame], dict[int, int]],
) -> None:
    directory, frames, _ = flippable
    rng = random.Random(12)
    before_tail = frames[:-1]
    positions = [(f, offset) for f in before_tail for offset in range(f.start, f.end)]
    missed = []
    for f, offset in rng.sample(positions, 1200):
        mask = rng.randint(1, 255)
        error = flip_and_open(directory, f.segment, offset, mask)
        if not (
            isinstance(error, LogCorrupted)
            and error.segment == f.segment
            and error.offset <= f.start
        ):
            missed.append((f.segment, offset, f.start, mask, error))
    assert missed == [], f"{len(missed)} flips not reported at their frame, e.g. {missed[:5]}"
    assert len(read_all(directory)) == 50  # every flip was undone


def test_every_byte_flipped_in_a_segment_header_is_reported(
    flippable: tuple[str, list[Frame], dict[int, int]],
) -> None:
    directory, _, starts = flippable
    rng = random.Random(13)
    missed = []
    for number, data_start in starts.items():
        for offset in range(data_start):
            mask = rng.randint(1, 255)
            error = flip_and_open(directory, number, offset, mask)
            if offset < 8:
                expected: tuple[type[StrataError], ...] = (NotAStrataLog, LogCorrupted)
            elif offset < 10:
                expected = (UnsupportedLogVersion, LogCorrupted)
            else:
                expected = (LogCorrupted,)
            names_segment = isinstance(error, LogCorrupted) and error.segment == number
            names_file = getattr(error, "path", None) == str(segment(directory, number))
            if not (isinstance(error, expected) and (names_segment or names_file)):
                missed.append((number, offset, mask, error))
    assert missed == [], f"{len(missed)} header flips not reported, e.g. {missed[:5]}"


def test_a_byte_flipped_under_an_open_log_is_reported_when_read_never_returned(
    log_dir: str,
) -> None:
    rng = random.Random(14)
    with OperationLog.create(log_dir, "writer") as log:
        append_transactions(log, [1] * 10, rng)
        _, frames = layout(log_dir)
        path = segment(log_dir, 1)
        pristine = path.read_bytes()
        for seq, f in enumerate(frames, start=1):
            damaged = bytearray(pristine)
            damaged[f.end - 2] ^= 0x10  # inside the event's state
            path.write_bytes(damaged)
            with pytest.raises(LogCorrupted) as caught:
                log.read(seq, seq)
            assert (caught.value.segment, caught.value.offset) == (1, f.start)
        path.write_bytes(pristine)
        assert len(log.read()) == 10


# --- tampering ------------------------------------------------------------------------------


@pytest.fixture
def three_segments(log_dir: str) -> str:
    rng = random.Random(21)
    with OperationLog.create(log_dir, "writer", segment_size=SEGMENT_SIZE) as log:
        append_transactions(log, [1, 2, 3] * 7, rng)
    assert segment_count(log_dir) == 3
    return log_dir


def open_fails_at(directory: str) -> tuple[int, int]:
    with pytest.raises(LogCorrupted) as caught:
        OperationLog.open(directory, "auditor")
    return caught.value.segment, caught.value.offset


def test_a_deleted_middle_segment_is_reported(three_segments: str) -> None:
    segment(three_segments, 2).unlink()
    assert open_fails_at(three_segments) == (2, 0)


def test_a_deleted_first_segment_is_reported(three_segments: str) -> None:
    segment(three_segments, 1).unlink()
    assert open_fails_at(three_segments) == (1, 0)


def test_segments_swapped_by_name_are_reported(three_segments: str) -> None:
    segment(three_segments, 2).rename(Path(three_segments, "swap"))
    segment(three_segments, 3).rename(segment(three_segments, 2))
    Path(three_segments, "swap").rename(segment(three_segments, 3))
    assert open_fails_at(three_segments) == (2, 0)


def test_a_segment_renamed_past_a_gap_is_reported(three_segments: str) -> None:
    segment(three_segments, 3).rename(segment(three_segments, 4))
    assert open_fails_at(three_segments) == (3, 0)


def test_a_segment_copied_from_another_log_is_reported(three_segments: str, tmp_path: Path) -> None:
    other = str(tmp_path / "other")
    with OperationLog.create(other, "elsewhere", segment_size=SEGMENT_SIZE) as log:
        append_transactions(log, [1, 2, 3] * 7, random.Random(21))
    shutil.copyfile(segment(other, 2), segment(three_segments, 2))
    assert open_fails_at(three_segments) == (2, 0)


def resign(directory: str, f: Frame, state: bytes) -> int:
    """Re-encode the record in ``f`` with another state and fresh checksums; return the shift."""
    path = segment(directory, f.segment)
    data = path.read_bytes()
    fields = msgpack.unpackb(data[f.start + FRAME_HEADER_SIZE : f.end], raw=False)
    fields[8] = state
    forged = frame(msgpack.packb(fields, use_bin_type=True))
    path.write_bytes(data[: f.start] + forged + data[f.end :])
    return len(forged) - (f.end - f.start)


def test_a_record_rewritten_with_valid_checksums_breaks_the_chain_at_its_successor(
    three_segments: str,
) -> None:
    _, frames = layout(three_segments)
    victim, successor = frames[4], frames[5]
    assert victim.segment == successor.segment == 1
    shift = resign(three_segments, victim, b"a different past")
    assert open_fails_at(three_segments) == (1, successor.start + shift)


def test_a_segments_last_record_rewritten_with_valid_checksums_breaks_the_next_segment(
    three_segments: str,
) -> None:
    _, frames = layout(three_segments)
    victim = [f for f in frames if f.segment == 1][-1]
    resign(three_segments, victim, b"a different past")
    assert open_fails_at(three_segments) == (2, 0)


# --- not a log at all -----------------------------------------------------------------------


E = TypeVar("E", bound=StrataError)


def refuses_untouched(path: Path, error: type[E]) -> E:
    watched = path if path.is_dir() else path.parent
    before = tree(watched)
    with pytest.raises(error) as caught:
        OperationLog.open(str(path), "reader")
    assert tree(watched) == before, "opening wrote to a directory it then refused"
    return caught.value


def test_an_empty_directory_is_not_a_log(tmp_path: Path) -> None:
    refuses_untouched(tmp_path, NotAStrataLog)


def test_a_missing_directory_is_not_a_log(tmp_path: Path) -> None:
    refuses_untouched(tmp_path / "nowhere", NotAStrataLog)


def test_a_file_is_not_a_log(tmp_path: Path) -> None:
    path = tmp_path / "segment-0000000001.log"
    path.write_bytes(b"just a file")
    refuses_untouched(path, NotAStrataLog)


def test_a_directory_with_a_foreign_file_named_like_a_segment_is_not_a_log(tmp_path: Path) -> None:
    segment(tmp_path, 1).write_bytes(os.urandom(300))
    refuses_untouched(tmp_path, NotAStrataLog)


def test_a_log_of_a_later_format_version_is_refused_untouched(log_dir: str) -> None:
    with OperationLog.create(log_dir, "writer") as log:
        append_transactions(log, [1, 2], random.Random(31))
    path = segment(log_dir, 1)
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, 8, 99)
    path.write_bytes(data)
    error = refuses_untouched(Path(log_dir), UnsupportedLogVersion)
    assert error.version == 99


def test_a_later_format_version_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    # What a newer Strata might leave: its first segment, with a preamble this version reads.
    data = bytearray(os.urandom(200))
    struct.pack_into(">8sHHII", data, 0, b"STRATLOG", 99, 0, 100, 0)
    segment(tmp_path, 1).write_bytes(data)
    refuses_untouched(tmp_path, UnsupportedLogVersion)
