"""The auditor's ``strata-log`` command, run as a real subprocess on logs written by the engine."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from engine.errors import LogCorrupted
from engine.log import NewEvent, OperationLog, Record, framing, segments
from engine.log.reader import CHUNK, ReadOnlyLog
from engine.log.scan import SECTOR
from engine.log.store import TORN_DIR
from tests.log import witnesses
from tests.log_tools.cli import strata_log

SEGMENT_SIZE = 4096
TOPIC = "engine.aggregates.image.Image.Requested"


run = strata_log  # the command line as a user runs it


def make_log(repo: Path, transactions: int = 60) -> list[Record]:
    """A log over several segments, appended by two hosts; returns what the engine reads back."""
    repo.mkdir()
    first = OperationLog.create(str(repo / "log"), "host-a", segment_size=SEGMENT_SIZE)
    second = OperationLog.open(str(repo / "log"), "host-b", segment_size=SEGMENT_SIZE)
    ids: list[uuid.UUID | str] = [uuid.uuid4() for _ in range(4)] + ["pool-1"]
    versions = dict.fromkeys(ids, 0)
    try:
        for n in range(transactions):
            log = second if n % 3 == 0 else first
            log.refresh()
            originator = ids[n % len(ids)]
            events = []
            for k in range(1 + n % 3):
                versions[originator] += 1
                state = msgpack.packb({"n": n, "k": k, "size": 1 << 30})
                events.append(NewEvent(originator, versions[originator], TOPIC, state))
            log.append(events)
        first.refresh()
        return first.read()
    finally:
        first.close()
        second.close()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with a hash of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def segment_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("segment-*.log"))


def data_start(path: Path) -> int:
    """Where the first record frame of a segment begins, by the engine's own header reader."""
    fd = os.open(path, os.O_RDONLY)
    try:
        number = int(path.stem.split("-")[1])
        return segments.read_header(fd, str(path), number)[1]
    finally:
        os.close(fd)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --- ways a log is damaged: each returns (segment, offset) that verify must name -------------


def flip_first_record_of_segment_2(log_dir: Path) -> tuple[int, int]:
    path = segment_files(log_dir)[1]
    start = data_start(path)
    flip(path, start + framing.FRAME_HEADER_SIZE + 3)
    return 2, start


def flip_a_record_before_the_tail_of_the_last_segment(log_dir: Path) -> tuple[int, int]:
    path = segment_files(log_dir)[-1]
    start = data_start(path)
    flip(path, start + 1)  # the frame's length: its header checksum no longer matches
    return int(path.stem.split("-")[1]), start


def flip_a_segment_header(log_dir: Path) -> tuple[int, int]:
    flip(segment_files(log_dir)[2], framing.SEGMENT_PREAMBLE.size + 2)
    return 3, 0


def remove_segment_2(log_dir: Path) -> tuple[int, int]:
    segment_files(log_dir)[1].unlink()
    return 2, 0


DAMAGE = [
    flip_first_record_of_segment_2,
    flip_a_record_before_the_tail_of_the_last_segment,
    flip_a_segment_header,
    remove_segment_2,
]


# --- ways a crash leaves a torn tail: each returns how many bytes past the last whole one -----


def append_then_keep(log_dir: Path, events: list[NewEvent], keep: Callable[[bytes], bytes]) -> int:
    """Append a real transaction, then leave only ``keep(its bytes)`` of it, as a crash would."""
    path = segment_files(log_dir)[-1]
    end = path.stat().st_size
    with OperationLog.open(str(log_dir), "host-c") as log:  # default size: no roll-over
        [first, *_] = log.append(events)
    witnesses.forget_from(log_dir, first)  # a crash: the append was never acknowledged
    written = path.read_bytes()[end:]
    torn = keep(written)
    with open(path, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        f.write(torn)
    return len(torn)


def cut_a_frame_short(log_dir: Path) -> int:
    event = NewEvent("pool-2", 1, TOPIC, b"\x90")
    return append_then_keep(log_dir, [event], lambda written: written[:20])


def leave_a_transaction_without_its_last_record(log_dir: Path) -> int:
    events = [NewEvent("pool-2", 1, TOPIC, b"\x90"), NewEvent("pool-2", 2, TOPIC, b"\x90")]

    def first_frame(written: bytes) -> bytes:
        length = framing.FRAME_HEADER.unpack_from(written)[0]
        return written[: framing.FRAME_HEADER_SIZE + length]

    return append_then_keep(log_dir, events, first_frame)


def leave_sectors_unwritten(log_dir: Path) -> int:
    end = segment_files(log_dir)[-1].stat().st_size
    event = NewEvent("pool-2", 1, TOPIC, msgpack.packb(b"x" * 2000))
    boundary = -(-(end + 100) // SECTOR) * SECTOR  # the first sector the crash kept from disk

    def zero_from_boundary(written: bytes) -> bytes:
        kept = boundary - end
        return written[:kept] + bytes(len(written) - kept)

    return append_then_keep(log_dir, [event], zero_from_boundary)


TORN = [cut_a_frame_short, leave_a_transaction_without_its_last_record, leave_sectors_unwritten]


# --- verify ------------------------------------------------------------------------------------


def test_verify_reports_the_counts_of_a_sound_log_and_writes_nothing(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")
    before = tree_digest(tmp_path)

    done = run("verify", tmp_path / "repo", "--json")

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert report["status"] == "sound"
    assert report["segments"] == len(segment_files(tmp_path / "repo" / "log")) > 2
    assert report["records"] == len(records) == report["last_seq"]
    assert report["first_seq"] == 1
    assert report["transactions"] == sum(r.txn_last for r in records) == 60
    assert report["aggregates"] == 5
    assert report["hosts"] == {
        "host-a": sum(r.host_id == "host-a" for r in records),
        "host-b": sum(r.host_id == "host-b" for r in records),
    }
    assert report["first_time_ns"] == records[0].time_ns
    assert report["last_time_ns"] == records[-1].time_ns
    assert report["tail"]["state"] == "clean"
    assert report["damage"] is None
    assert tree_digest(tmp_path) == before


def test_verify_of_a_repository_and_of_its_log_directory_agree(tmp_path: Path) -> None:
    make_log(tmp_path / "repo")

    of_repo = run("verify", tmp_path / "repo", "--json")
    of_log = run("verify", tmp_path / "repo" / "log", "--json")

    assert of_repo.returncode == of_log.returncode == 0
    assert json.loads(of_repo.stdout) == json.loads(of_log.stdout)


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_verify_names_the_first_damaged_segment_and_offset(
    tmp_path: Path, damage: Callable[[Path], tuple[int, int]]
) -> None:
    make_log(tmp_path / "repo")
    segment, offset = damage(tmp_path / "repo" / "log")

    as_json = run("verify", tmp_path / "repo", "--json")
    as_text = run("verify", tmp_path / "repo")

    for done in (as_json, as_text):
        assert done.returncode == 1
        assert done.stderr.startswith("strata-log: error [log_corrupted]: ")
        assert f"segment {segment} at byte offset {offset}" in done.stderr
        assert done.stderr.count("\n") == 1
    assert f"DAMAGED in segment {segment} at byte offset {offset}" in as_text.stdout
    report = json.loads(as_json.stdout)
    assert report["status"] == "damaged"
    assert (report["damage"]["segment"], report["damage"]["offset"]) == (segment, offset)
    assert report["damage"]["code"] == "log_corrupted"


def test_verify_counts_the_records_read_before_the_damage(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")
    log_dir = tmp_path / "repo" / "log"
    flip_first_record_of_segment_2(log_dir)
    with open(segment_files(log_dir)[1], "rb") as f:
        first_seq_of_2 = segments.read_header(f.fileno(), f.name, 2)[0].first_seq

    report = json.loads(run("verify", log_dir, "--json").stdout)

    assert report["records"] == first_seq_of_2 - 1 == report["last_seq"]
    assert report["last_time_ns"] == records[first_seq_of_2 - 2].time_ns


@pytest.mark.parametrize("tear", TORN, ids=lambda f: f.__name__)
def test_verify_calls_a_torn_tail_sound_and_leaves_every_byte_alone(
    tmp_path: Path, tear: Callable[[Path], int]
) -> None:
    records = make_log(tmp_path / "repo")
    log_dir = tmp_path / "repo" / "log"
    last_segment = segment_files(log_dir)[-1]
    end = last_segment.stat().st_size
    torn_bytes = tear(log_dir)
    (log_dir / segments.LOCK_NAME).unlink()  # as in a copy handed to an auditor
    before = tree_digest(tmp_path)

    as_json = run("verify", tmp_path / "repo", "--json")
    as_text = run("verify", tmp_path / "repo")

    assert tree_digest(tmp_path) == before
    assert as_json.returncode == as_text.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["status"] == "sound"
    assert report["records"] == len(records)
    assert report["tail"] == {
        "state": "torn",
        "segment": len(segment_files(log_dir)),
        "offset": end,
        "torn_bytes": torn_bytes,
    }
    assert "torn" in as_text.stdout
    assert "not part of the log" in as_text.stdout
    assert f"cut them at offset {end}" in as_text.stdout


def test_the_next_appender_cuts_a_torn_tail_where_verify_said(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")
    log_dir = tmp_path / "repo" / "log"
    cut_a_frame_short(log_dir)
    offset = json.loads(run("verify", log_dir, "--json").stdout)["tail"]["offset"]

    with OperationLog.open(str(log_dir), "host-c", segment_size=SEGMENT_SIZE) as log:
        log.append([NewEvent("pool-2", 1, TOPIC, b"\x90")])

    kept = os.listdir(log_dir / TORN_DIR)
    assert len(kept) == 1 and f".at-{offset}." in kept[0]
    report = json.loads(run("verify", log_dir, "--json").stdout)
    assert report["tail"]["state"] == "clean"
    assert report["kept_torn_tails"] == kept
    assert report["records"] == len(records) + 1


# --- dump --------------------------------------------------------------------------------------


def test_dump_json_lines_hold_exactly_what_was_appended(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")

    done = run("dump", tmp_path / "repo", "--json")

    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        assert line["seq"] == record.seq
        assert bytes.fromhex(line["prev_hash"]) == record.prev_hash
        assert line["host_id"] == record.host_id
        assert line["time_ns"] == record.time_ns
        assert line["txn_last"] == record.txn_last
        assert line["originator_id"] == str(record.originator_id)
        assert line["originator_type"] == ("str" if record.originator_id == "pool-1" else "uuid")
        assert line["originator_version"] == record.originator_version
        assert line["topic"] == record.topic
        assert bytes.fromhex(line["state"]) == record.state


def test_dump_from_and_limit_select_a_window_across_segments(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")
    start = records[-1].seq - 20  # in a later segment: the earlier ones are skipped

    window = run("dump", tmp_path / "repo", "--json", "--from", str(start), "--limit", "7")
    beyond = run("dump", tmp_path / "repo", "--json", "--from", str(records[-1].seq + 1))

    assert window.returncode == beyond.returncode == 0
    assert [json.loads(line)["seq"] for line in window.stdout.splitlines()] == list(
        range(start, start + 7)
    )
    assert beyond.stdout == ""


def test_dump_shows_each_record_on_one_line_with_its_state_decoded(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")

    done = run("dump", tmp_path / "repo")

    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == len(records)
    first = lines[0].split()
    assert first[0] == "1"
    assert first[1].endswith("Z") and first[1].startswith("20")
    assert first[2:6] == [records[0].host_id, str(records[0].originator_id), "v1", TOPIC]
    assert "'size': 1073741824" in lines[0]


def test_dump_prints_what_it_read_before_damage_and_fails(tmp_path: Path) -> None:
    make_log(tmp_path / "repo")
    log_dir = tmp_path / "repo" / "log"
    segment, offset = flip_first_record_of_segment_2(log_dir)
    with open(segment_files(log_dir)[1], "rb") as f:
        first_seq_of_2 = segments.read_header(f.fileno(), f.name, 2)[0].first_seq

    done = run("dump", log_dir, "--json")

    assert done.returncode == 1
    assert len(done.stdout.splitlines()) == first_seq_of_2 - 1
    assert f"segment {segment} at byte offset {offset}" in done.stderr


def test_dump_notes_a_torn_tail_on_stderr(tmp_path: Path) -> None:
    records = make_log(tmp_path / "repo")
    cut_a_frame_short(tmp_path / "repo" / "log")

    done = run("dump", tmp_path / "repo", "--json")

    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == len(records)
    assert "torn tail" in done.stderr


# --- not a log, bad arguments ------------------------------------------------------------------


def missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere"


def empty_directory(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def plain_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("hello\n")
    return tmp_path / "notes.txt"


def repository_without_segments(tmp_path: Path) -> Path:
    (tmp_path / "repo" / "log").mkdir(parents=True)
    return tmp_path / "repo"


def segment_of_another_program(tmp_path: Path) -> Path:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / segments.segment_name(1)).write_bytes(b"PK\x03\x04 not ours" * 10)
    return tmp_path / "log"


@pytest.mark.parametrize(
    "make_path",
    [missing, empty_directory, plain_file, repository_without_segments, segment_of_another_program],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("command", ["verify", "dump"])
def test_a_path_that_is_not_a_log_exits_2_with_one_line(
    tmp_path: Path, make_path: Callable[[Path], Path], command: str
) -> None:
    done = run(command, make_path(tmp_path), "--json")

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("strata-log: error [not_a_strata_log]: ")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_a_log_of_a_later_format_version_exits_2(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    header = framing.SegmentHeader(framing.VERSION + 1, 1, 1, framing.ZERO_HASH, 0, "host-z")
    (tmp_path / "log" / segments.segment_name(1)).write_bytes(framing.encode_segment_header(header))

    done = run("verify", tmp_path)

    assert done.returncode == 2
    assert done.stderr.startswith("strata-log: error [unsupported_log_version]: ")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["verify"], ["dump", ".", "--limit", "0"], ["dump", ".", "--from", "x"], ["fsck", "."]],
    ids=["no command", "no path", "zero limit", "bad from", "unknown command"],
)
def test_bad_arguments_exit_2_with_usage(args: list[str]) -> None:
    done = run(*args)

    assert done.returncode == 2
    assert "usage: strata-log" in done.stderr
    assert "Traceback" not in done.stderr


# --- the reader's chunks -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [16, 100, 700, CHUNK])
@pytest.mark.parametrize("tear", TORN, ids=lambda f: f.__name__)
def test_reading_in_any_chunk_size_gives_the_engines_records_and_tail(
    tmp_path: Path, chunk: int, tear: Callable[[Path], int]
) -> None:
    records = make_log(tmp_path / "repo", transactions=20)
    log_dir = tmp_path / "repo" / "log"
    end = segment_files(log_dir)[-1].stat().st_size
    tear(log_dir)

    log = ReadOnlyLog(str(log_dir), chunk=chunk)

    assert list(log.records()) == records
    assert log.tail is not None and log.tail.end == end and log.tail.torn


@pytest.mark.parametrize("chunk", [16, 100, 700, CHUNK])
def test_reading_in_any_chunk_size_finds_the_same_damage(tmp_path: Path, chunk: int) -> None:
    records = make_log(tmp_path / "repo", transactions=20)
    segment, offset = flip_first_record_of_segment_2(tmp_path / "repo" / "log")
    log = ReadOnlyLog(str(tmp_path / "repo" / "log"), chunk=chunk)
    read: list[Record] = []

    with pytest.raises(LogCorrupted) as raised:
        read.extend(log.records())

    assert (raised.value.segment, raised.value.offset) == (segment, offset)
    assert read == records[: len(read)] and read[-1].txn_last
