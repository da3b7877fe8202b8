"""Segment files of a log directory: names, headers, and creating one durably.

A log directory holds ``segment-0000000001.log``, ``segment-0000000002.log``, ... and a ``lock``
file for the appenders' byte-range lock. A new segment is written under a temporary name, synced,
renamed into place and the directory synced, so a reader never sees half a header; a crash leaves
at most a ``.segment-*.tmp`` file that the next appender removes.

Imports: its own package, ``engine.errors``, msgpack; the standard library.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

import msgpack

from engine.errors import LogCorrupted, NotAStrataLog, UnsupportedLogVersion
from engine.log.framing import (
    FORMAT_NAME,
    MAGIC,
    SEGMENT_PREAMBLE,
    SUPPORTED_VERSIONS,
    SegmentHeader,
    crc,
    encode_segment_header,
)

LOCK_NAME = "lock"
_NAME = re.compile(r"segment-(\d{10})\.log")
_MAX_HEADER_BODY = 64 * 1024


def segment_name(number: int) -> str:
    return f"segment-{number:010d}.log"


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, segment_name(number))


def list_segments(directory: str) -> list[int]:
    """The segment numbers present, checked to run 1..N without a gap."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError as e:
        raise NotAStrataLog("no such directory", path=directory) from e
    except NotADirectoryError as e:
        raise NotAStrataLog("not a directory", path=directory) from e
    numbers = sorted(int(m.group(1)) for m in map(_NAME.fullmatch, names) if m)
    for expected, number in enumerate(numbers, start=1):
        if number != expected:
            raise LogCorrupted(
                f"segment {expected} is missing (found {segment_name(number)})",
                segment=expected,
                offset=0,
            )
    return numbers


def open_segment(path: str, number: int) -> int:
    """Open a segment for reading: a regular file, never through a symbolic link
    (architecture §6)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise LogCorrupted(
            "the segment is a symbolic link, which Strata never follows", segment=number, offset=0
        ) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogCorrupted("the segment is not a regular file", segment=number, offset=0)
    return fd


def read_header(fd: int, path: str, number: int) -> tuple[SegmentHeader, int]:
    """Read and check a segment's header; return it and the offset of its first record."""
    preamble = os.pread(fd, SEGMENT_PREAMBLE.size, 0)
    if len(preamble) < SEGMENT_PREAMBLE.size or not preamble.startswith(MAGIC):
        raise NotAStrataLog("missing the STRATLOG magic bytes", path=path)
    _, version, reserved, body_len, body_crc = SEGMENT_PREAMBLE.unpack(preamble)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedLogVersion(path=path, version=version, supported=max(SUPPORTED_VERSIONS))
    if reserved != 0:  # version 1 writes zeros; anything else is a damaged preamble
        raise LogCorrupted("segment header reserved bytes are not zero", segment=number, offset=0)
    if body_len > _MAX_HEADER_BODY:
        raise LogCorrupted("segment header length out of range", segment=number, offset=0)
    body = os.pread(fd, body_len, SEGMENT_PREAMBLE.size)
    if len(body) != body_len or crc(body) != body_crc:
        raise LogCorrupted("segment header checksum mismatch", segment=number, offset=0)
    try:
        fields = msgpack.unpackb(body, raw=False)
        header = SegmentHeader(
            version=fields["version"],
            segment=fields["segment"],
            first_seq=fields["first_seq"],
            prev_hash=fields["prev_hash"],
            created_ns=fields["created_ns"],
            host_id=fields["host_id"],
        )
    except (ValueError, KeyError, TypeError) as e:
        raise LogCorrupted(f"segment header does not decode ({e})", segment=number, offset=0) from e
    if fields.get("format") != FORMAT_NAME or header.version != version:
        raise LogCorrupted("segment header names another format", segment=number, offset=0)
    if header.segment != number:
        raise LogCorrupted(f"segment file holds segment {header.segment}", segment=number, offset=0)
    return header, SEGMENT_PREAMBLE.size + body_len


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_segment(directory: str, header: SegmentHeader) -> None:
    """Durably create segment ``header.segment``; refuses to replace an existing one."""
    final = segment_path(directory, header.segment)
    tmp = os.path.join(directory, f".{segment_name(header.segment)}.{os.getpid()}.tmp")
    data = encode_segment_header(header)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if the name exists, where rename() would silently replace a segment.
        os.link(tmp, final)
    finally:
        os.unlink(tmp)
    fsync_directory(directory)


def remove_stale_temporaries(directory: str) -> None:
    for name in os.listdir(directory):
        if name.startswith(".segment-") and name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    number: int
    first_seq: int
    data_start: int  # offset of the first record frame
