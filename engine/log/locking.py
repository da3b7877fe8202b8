"""Byte-range locks on the shared storage that serialize appenders across processes and hosts.

Open-file-description (OFD) locks: unlike classic POSIX ``lockf`` locks they belong to an open
file, not to a process, so two threads (or two logs opened in one process, as tests do) exclude
each other too, and closing an unrelated descriptor of the same file never drops them. The Linux
NFS client maps them onto NFSv4 byte-range locks, which the server reclaims when a client's lease
expires: a fenced host cannot hold the log hostage. Where the platform lacks OFD locks we fall
back to ``lockf`` plus a process-wide mutex.

A lock is first tried without waiting: the uncontended path (every append of a lone host) costs
the one system call it always did and logs nothing. Only a wait is timed, and one long enough to
matter to an operator (another host holding the log through a slow or stuck storage) is logged.

Imports: the standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
from types import TracebackType

_F_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_F_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)
_BUSY = (errno.EAGAIN, errno.EACCES)  # what a lock held elsewhere answers a try
# A wait this long is worth an operator's line: appends of healthy hosts hold the lock for
# a write and a sync, milliseconds.
SLOW_WAIT = 1.0
logger = logging.getLogger("engine.log")
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_fallback_mutex = threading.Lock()


class RangeLock:
    """An exclusive or shared lock on bytes ``[start, start + length)`` of one file."""

    def __init__(self, path: str, start: int = 0, length: int = 1, *, readonly: bool = False):
        # A read-only lock (shared only) neither creates the file nor needs write access, so an
        # auditor with read-only access to the storage can still wait out an append in progress.
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        self._path = path
        self._readonly = readonly
        self._start = start
        self._length = length
        self._held_fallback = False

    def acquire(self, *, shared: bool = False) -> None:
        if self._readonly and not shared:
            raise ValueError("a read-only lock can only be taken shared")
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        if _F_OFD_SETLK is not None and _F_OFD_SETLKW is not None:
            request = _FLOCK.pack(kind, os.SEEK_SET, self._start, self._length, 0)
            try:
                fcntl.fcntl(self._fd, _F_OFD_SETLK, request)
                return
            except OSError as e:
                if e.errno not in _BUSY:
                    raise
            started = time.monotonic()
            fcntl.fcntl(self._fd, _F_OFD_SETLKW, request)
            self._waited(time.monotonic() - started)
            return
        _fallback_mutex.acquire()
        self._held_fallback = True
        fcntl.lockf(self._fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, self._length, self._start)

    def _waited(self, seconds: float) -> None:
        if seconds >= SLOW_WAIT:
            logger.warning(
                "waited %.1f s for the lock on %s: another process or host held it that long",
                seconds, self._path, extra={"path": self._path, "waited": round(seconds, 1)},
            )  # fmt: skip

    def release(self) -> None:
        if _F_OFD_SETLKW is not None:
            fcntl.fcntl(
                self._fd,
                _F_OFD_SETLKW,
                _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self._start, self._length, 0),
            )
            return
        fcntl.lockf(self._fd, fcntl.LOCK_UN, self._length, self._start)
        if self._held_fallback:
            self._held_fallback = False
            _fallback_mutex.release()

    def __enter__(self) -> RangeLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the description drops any lock it held
            self._fd = -1
