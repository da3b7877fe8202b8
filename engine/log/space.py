"""Appending on storage that may fail: allocate before writing, undo a write that failed.

An append must either commit or leave nothing that any reader takes as committed (architecture §6,
docs/adr/0019-a-failed-append-leaves-nothing.md). Three things make that so:

- The space for the records is allocated (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``, so the
  file's size and so what readers see does not change) before a byte is written, a little ahead
  so that most appends need no extra call: a full filesystem then fails the append before it
  writes anything, where a plain ``write`` would stop halfway through a group of records.
- ``pwrite`` fails only when it wrote nothing; a short write, or a failed ``fdatasync``, is
  undone by cutting the segment back to where the append began, under the appenders' lock, so
  readers (who take a shared lock to learn how far the log is committed) never saw it.
- When even the undoing fails, whatever the write left may be read back as committed by the next
  reader: the caller is told :class:`~engine.errors.CommitUnknown`, and the appender reads the
  tail again before its next append.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from typing import NoReturn

from engine.errors import CommitUnknown, storage_error

RESERVE_AHEAD = 256 * 1024  # allocated past the records being written: most appends skip it
_FALLOC_FL_KEEP_SIZE = 0x01
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None  # not Linux (or no glibc): appends go on without allocating first
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def reserve(fd: int, offset: int, length: int, path: str) -> int:
    """Allocate ``[offset, offset + length)`` of the file and a little more, without changing
    its size; return how far space is allocated now. Raises :class:`StorageFull` (nothing
    written) when even ``length`` bytes cannot be had. Where the filesystem cannot allocate
    ahead (some NFS servers), returns ``offset + length`` and the write itself finds out."""
    if _fallocate is None:
        return offset + length
    for size in (length + RESERVE_AHEAD, length):
        if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, size) == 0:
            return offset + size
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            return offset + length
        if err not in (errno.ENOSPC, errno.EDQUOT):
            break
    raise storage_error(OSError(err, os.strerror(err)), "Appending to", path)


def undo_write(fd: int, end: int, error: OSError, path: str) -> NoReturn:
    """After a short write or failed sync of what was written at ``end``: cut it off and
    raise the typed error for ``error``; if even that fails, raise :class:`CommitUnknown`."""
    try:
        os.ftruncate(fd, end)
        os.fsync(fd)
    except OSError as undo:
        raise CommitUnknown(
            f"{error.strerror or error}; cutting the write off failed too: {undo.strerror or undo}",
            path=path,
        ) from error
    raise storage_error(error, "Appending to", path) from error
