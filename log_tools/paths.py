"""Where the log is: the tools accept a repository directory or its ``log/`` directory.

Imports: ``engine.errors``, ``engine.formats``, ``engine.log``; the standard library.
"""

from __future__ import annotations

import argparse
import os
import stat

from engine.errors import LogCorrupted, NotAStrataLog
from engine.formats.repository.localfs import MARKER as REPOSITORY_MARKER
from engine.log import segments

LOG_DIR_NAME = "log"


def find_log_dir(path: str) -> str:
    """The absolute log directory that ``path`` names, looked up without writing anything."""
    path = os.path.abspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotAStrataLog("no such file or directory", path=path) from None
    except NotADirectoryError:  # a file on the way to it
        raise NotAStrataLog("not a directory", path=path) from None
    # Any other error (no permission to look) reaches the command line as it is: the path may
    # well be a log, which this user may not read.
    if not stat.S_ISDIR(mode):
        raise NotAStrataLog("not a directory", path=path)
    # Segments in the directory itself win: a log directory never holds a repository.
    if _has_segments(path):
        return path
    inner = os.path.join(path, LOG_DIR_NAME)
    if os.path.isdir(inner):
        if _has_segments(inner):
            return inner
        raise NotAStrataLog("its log/ directory holds no segment files", path=path)
    raise NotAStrataLog("no segment files and no log/ directory", path=path)


def _has_segments(directory: str) -> bool:
    try:
        return bool(segments.list_segments(directory))
    except LogCorrupted:
        return True  # a segment is missing: a damaged log, which the reader reports as such


def repository_root(path: str) -> str | None:
    """The repository directory ``path`` names (itself, or the parent of its ``log/``), or
    None when it is a log directory outside any repository."""
    path = os.path.abspath(path)
    for candidate in (path, os.path.dirname(path)):
        marked = os.path.isfile(os.path.join(candidate, REPOSITORY_MARKER))
        if marked and (candidate == path or os.path.basename(path) == LOG_DIR_NAME):
            return candidate
    return None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a sequence number, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a time limit in seconds, in (0, 86400]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be in (0, 86400], not {value}")
    return value
