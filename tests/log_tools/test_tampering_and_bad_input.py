"""Edits to a real run's log are found where they are; bad input gets one line, no traceback.

The story's log rolls over every 4 KiB, so it has several segments to damage.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from engine.log import framing, segments
from engine.log.framing import Record
from engine.log.scan import scan
from tests.log_tools.cli import Story, one_line_error, strata_log

SEGMENT = 2  # a segment in the middle: damage there is never a torn tail


def frames(log_dir: Path, number: int) -> tuple[list[Record], list[int], bytes]:
    """A segment's records, the byte offset of each frame, and the file's bytes."""
    path = str(log_dir / segments.segment_name(number))
    fd = os.open(path, os.O_RDONLY)
    try:
        header, start = segments.read_header(fd, path, number)
    finally:
        os.close(fd)
    data = Path(path).read_bytes()
    found = scan(data[start:], start, number, header.first_seq, header.prev_hash)
    return found.records, found.offsets, data


def damaged_at(log: Path, segment: int, offset: int) -> None:
    """verify and replay both refuse the log, naming where."""
    where = f"segment {segment} at byte offset {offset}"
    one_line_error(strata_log("verify", log), 1, where)
    one_line_error(strata_log("replay", log), 1, where)
    one_line_error(strata_log("export", log, log.parent.parent / "x.sqlite"), 1, where)


def test_a_flipped_byte_is_found_at_its_record(log_copy: Path) -> None:
    log = log_copy / "log"
    records, offsets, data = frames(log, SEGMENT)
    k = len(records) // 2
    flipped = bytearray(data)
    flipped[offsets[k] + framing.FRAME_HEADER_SIZE + 7] ^= 0x40
    (log / segments.segment_name(SEGMENT)).write_bytes(bytes(flipped))
    damaged_at(log, SEGMENT, offsets[k])
    # The state before the damage is still there to see.
    before = strata_log("replay", log, "--until", str(records[0].seq - 1))
    assert before.returncode == 0, before.stderr


def test_a_deleted_record_is_found_where_it_was(log_copy: Path) -> None:
    log = log_copy / "log"
    records, offsets, data = frames(log, SEGMENT)
    k = len(records) // 2
    cut = data[: offsets[k]] + data[offsets[k + 1] :]
    (log / segments.segment_name(SEGMENT)).write_bytes(cut)
    damaged_at(log, SEGMENT, offsets[k])


def test_reordered_segments_are_found_at_the_first_one_out_of_place(log_copy: Path) -> None:
    log = log_copy / "log"
    a, b = log / segments.segment_name(SEGMENT), log / segments.segment_name(SEGMENT + 1)
    a.rename(log / "swap")
    b.rename(a)
    (log / "swap").rename(b)
    damaged_at(log, SEGMENT, 0)


def test_a_record_re_signed_without_its_successor_is_found_at_the_successor(
    log_copy: Path,
) -> None:
    log = log_copy / "log"
    records, offsets, data = frames(log, SEGMENT)
    k = len(records) // 2
    forged = records[k]._replace(host_id="host-x" if records[k].host_id != "host-x" else "host-y")
    frame = framing.frame(framing.encode_payload(forged))  # valid checksums, same length
    assert len(frame) == offsets[k + 1] - offsets[k]
    rewritten = data[: offsets[k]] + frame + data[offsets[k + 1] :]
    (log / segments.segment_name(SEGMENT)).write_bytes(rewritten)
    damaged_at(log, SEGMENT, offsets[k + 1])


def test_a_last_record_re_signed_with_an_event_that_does_not_decode_is_found(
    log_copy: Path,
) -> None:
    log = log_copy / "log"
    last = len(segments.list_segments(str(log)))
    records, offsets, data = frames(log, last)
    forged = records[-1]._replace(state=b"\xc1 not msgpack")  # nothing after it vouches
    rewritten = data[: offsets[-1]] + framing.frame(framing.encode_payload(forged))
    (log / segments.segment_name(last)).write_bytes(rewritten)
    damaged_at(log, last, offsets[-1])


@pytest.mark.parametrize(
    "command",
    [
        ["replay"], ["history", str(uuid.uuid4())], ["graph"], ["hosts"], ["follow"],
        ["export", "/tmp/never-written.sqlite"],
    ],
    ids=["replay", "history", "graph", "hosts", "follow", "export"],
)  # fmt: skip
def test_a_path_that_is_not_a_repository_is_refused_in_one_line(
    command: list[str], tmp_path: Path
) -> None:
    name, *rest = command
    one_line_error(strata_log(name, tmp_path, *rest), 2, "is not a Strata log")
    assert not os.path.exists("/tmp/never-written.sqlite")


def test_a_file_or_a_missing_path_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a log")
    one_line_error(strata_log("replay", tmp_path / "file"), 2, "not a directory")
    one_line_error(strata_log("replay", tmp_path / "missing"), 2, "no such file")


def test_an_image_the_log_never_named_is_refused_in_one_line(story: Story) -> None:
    one_line_error(strata_log("history", story.repo, str(uuid.uuid4())), 2, "not found")
    one_line_error(strata_log("history", story.repo, "../../etc/passwd"), 2, "not an image id")


@pytest.mark.parametrize(
    ("until", "words"),
    [
        ("2000-01-01T00:00:00Z", "before the log began"),
        ("2999-01-01T00:00:00Z", "in the future"),
        ("999999", "past the end of the log"),
        ("0", "starts at 1"),
        ("last tuesday", "neither a sequence number nor an ISO 8601 time"),
    ],
)
def test_a_point_outside_the_log_is_refused_in_one_line(
    story: Story, until: str, words: str
) -> None:
    for command in ("replay", "graph"):
        one_line_error(strata_log(command, story.repo, "--until", until), 2, words)
