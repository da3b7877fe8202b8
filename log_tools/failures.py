"""What an error that reaches a command means, and the exit status that says so.

The engine turns what it meets into its typed errors (:mod:`engine.errors`). An operating
system error that still reaches a command (a segment replaced by a directory, a file this user
may not read, an output directory that is full) is translated here into one, so that every
command prints one line and no traceback, and the exit status tells damage to the log apart
from a tool that could not finish: only damage is called damage.

Imports: its own package, ``engine.errors``, ``engine.log``; the standard library.
"""

from __future__ import annotations

import contextlib
import os
import stat

from engine.errors import (
    ImageNotFound,
    InvalidParameter,
    LogCorrupted,
    NotAStrataLog,
    StrataError,
    ToolFailed,
    UnsupportedLogVersion,
)
from engine.log import segments
from log_tools.paths import find_log_dir

EXIT_DAMAGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

# The path is not a log, or the arguments ask for something the log cannot give.
_USAGE = (InvalidParameter, NotAStrataLog, UnsupportedLogVersion, ImageNotFound)


def exit_status(error: StrataError) -> int:
    if isinstance(error, LogCorrupted):
        return EXIT_DAMAGED
    if isinstance(error, _USAGE):
        return EXIT_USAGE
    return EXIT_FAILED  # e.g. the storage refused a read: the log may well be sound


def from_os_error(error: OSError, path: str | None) -> StrataError:
    """The typed error for ``error``, met by a command given the log ``path``."""
    # Reading a directory where a segment belongs fails in pread(), which names no file: the
    # log directory itself says which segment it is.
    number = None if path is None else irregular_segment(path)
    if number is not None:
        return LogCorrupted(
            "the segment is not a regular file (a directory or a device stands in its place)",
            segment=number,
            offset=0,
        )
    reason = error.strerror or str(error)
    if error.filename is None:
        return ToolFailed(f"the operating system refused a read or a write: {reason}")
    return ToolFailed(f"{error.filename}: {reason}")


def irregular_segment(path: str) -> int | None:
    """The first segment of the log at ``path`` that is not a regular file, if any."""
    with contextlib.suppress(StrataError, OSError):
        log_dir = find_log_dir(path)
        for number in segments.list_segments(log_dir):
            mode = os.lstat(segments.segment_path(log_dir, number)).st_mode
            if not stat.S_ISREG(mode):
                return number
    return None
