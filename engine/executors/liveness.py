"""Host liveness on the shared storage: heartbeats, the host-id lock, and who counts as dead.

One file per host id in each repository (docs/adr/0005-executors-hosts-and-fencing.md)::

    <root>/hosts/<host_id>      this host's heartbeat record, rewritten in place at each renewal

The process that is connected as ``host_id`` holds an exclusive OFD lock on the file's first
byte for as long as it is connected. A second live process with the same host id cannot take
it and is refused with :class:`~engine.errors.HostIdInUse`; a process that died (``kill -9``,
a crash) loses the lock with its last file descriptor, so a restart under the old id is not
blocked. On NFSv4 the server releases a dead client's locks when its lease expires.

The record is one 512-byte, sector-aligned ``pwrite`` at offset 0 holding JSON and a CRC (the
way sanlock writes its delta-lease sectors): a reader sees a whole record, or one it knows is
torn. Writing in place, instead of renaming a new file over the old one, keeps one inode whose
changes NFS readers see on every open (close-to-open consistency), where a rename can hide
behind a client's cached directory entries.

A heartbeat is not a log event: renewals would drown the history, and liveness is about now.

**Counting a host dead** follows a delta lease's rule: an observer counts another host dead once
it has seen that host's record unchanged for ``lease_timeout`` seconds of its *own* monotonic
clock. No clocks are compared across hosts (the wall time in the record is for people), so a
host whose clock is wrong is neither killed early nor kept alive forever. A host that released
its record (it disconnected cleanly) or that runs no executors holds no claim it will resume.

**Knowing that one's own lease lapsed.** A host that could not renew for ``lease_timeout``
(its storage hung, or the whole process was stopped: SIGSTOP, a VM pause) may have been counted
dead, and its claims taken over. :meth:`HostLease.term` tells: it moves on after such a gap,
and work claimed in an earlier term must not write anything others read.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

from engine.errors import HostIdInUse, InvalidParameter

logger = logging.getLogger("engine.executors")

HOSTS_DIR = "hosts"
RECORD_SIZE = 512  # one sector: written whole or, after a crash, not at all on most devices
_F_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (see engine/log/locking.py)
# Without OFD locks (not Linux) a classic lockf lock is per process: two engines in one process
# would share it, so this process also remembers which host files it holds.
_held_here: set[str] = set()
_held_here_lock = threading.Lock()


def hosts_dir(root: str) -> str:
    return os.path.join(root, HOSTS_DIR)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One renewal of a host's liveness, as written to ``hosts/<host_id>``."""

    host_id: str
    incarnation: str  # new at every connection: a restart under the same id is a new one
    pid: int
    hostname: str
    wall_time: float  # for people reading the file; never compared across hosts
    counter: int  # renewals in this incarnation
    lease_timeout: float
    runs_executors: bool
    released: bool = False  # the host disconnected cleanly: nothing of it is still running

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        line = json.dumps({"crc": zlib.crc32(body.encode()), "heartbeat": json.loads(body)})
        data = line.encode() + b"\n"
        if len(data) > RECORD_SIZE:
            raise InvalidParameter(f"a heartbeat of at most {RECORD_SIZE} bytes", name="host_id")
        return data.ljust(RECORD_SIZE, b" ")

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat | None:
        """The heartbeat in ``data``; None if it is empty, torn or not a heartbeat at all."""
        try:
            outer = json.loads(data.decode())
            fields = outer["heartbeat"]
            body = json.dumps(fields, sort_keys=True, separators=(",", ":"))
            if zlib.crc32(body.encode()) != outer["crc"]:
                return None
            return cls(**fields)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None


class HostLease:
    """This process's hold on ``host_id`` in one repository: the lock, and the renewed record.

    :meth:`acquire` takes the lock (or raises :class:`HostIdInUse`), writes the first record and
    starts a thread that renews it every ``lease_timeout / 4`` seconds. :meth:`release` writes a
    last record saying so, drops the lock and stops the thread.
    """

    def __init__(
        self,
        root: str,
        host_id: str,
        lease_timeout: float,
        *,
        runs_executors: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.path.join(hosts_dir(root), host_id)
        self.host_id = host_id
        self.lease_timeout = float(lease_timeout)
        self.runs_executors = runs_executors
        self.incarnation = uuid.uuid4().hex
        self.last_error: OSError | None = None  # the last renewal that failed, until one works
        self._clock = clock
        self._wall_clock = wall_clock
        self._mutex = threading.Lock()
        self._fd = -1
        self._counter = 0
        self._renewed_at = 0.0  # monotonic time when the last successful renewal *started*
        self._term = 0
        self._lapsed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def acquire(self) -> HostLease:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _lock(fd, self.path)
        except BlockingIOError:
            holder = read_heartbeat(self.path)
            os.close(fd)
            detail = "its record is unreadable" if holder is None else _describe(holder)
            raise HostIdInUse(detail, host_id=self.host_id, path=self.path) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self.renew()
            if self.last_error is not None:
                raise self.last_error
        except BaseException:
            self._unlock_and_close()
            raise
        self._thread = threading.Thread(target=self._run, name="strata-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Say that this host holds nothing here any more, and let the host id go."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._mutex:
            if self._fd < 0:
                return
            try:
                self._write(released=True)
            except OSError as e:
                # The storage is gone or failing: other hosts then count this one dead after
                # lease_timeout instead of at once. Nothing else depends on this last record.
                self.last_error = e
            finally:
                self._unlock_and_close()

    def _run(self) -> None:
        period = self.lease_timeout / 4
        while not self._stop.wait(period):
            self.renew()

    # --- renewing -------------------------------------------------------------------------

    def renew(self) -> None:
        """Write the next record. A failure is kept in :attr:`last_error` and retried at the
        next period: the lease simply ages, and :meth:`term` tells when it may have lapsed."""
        started = self._clock()
        with self._mutex:
            if self._fd < 0:
                return
            self._note_lapse(started)
            try:
                self._write(released=False)
            except OSError as e:
                if self.last_error is None:
                    logger.warning(
                        "host %s cannot renew its heartbeat in %s: %s; retrying every %.1f s",
                        self.host_id, self.path, e, self.lease_timeout / 4,
                        extra={"host": self.host_id, "path": self.path},
                    )  # fmt: skip
                self.last_error = e
                return
            if self.last_error is not None:
                logger.info(
                    "host %s renews its heartbeat in %s again",
                    self.host_id, self.path, extra={"host": self.host_id, "path": self.path},
                )  # fmt: skip
            self.last_error = None
            self._renewed_at = started
            self._lapsed = False

    def _write(self, *, released: bool) -> None:
        self._counter += 1
        beat = Heartbeat(
            host_id=self.host_id,
            incarnation=self.incarnation,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            wall_time=round(self._wall_clock(), 3),
            counter=self._counter,
            lease_timeout=self.lease_timeout,
            runs_executors=self.runs_executors,
            released=released,
        )
        data = beat.encode()
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(errno.EIO, "short write of a heartbeat", self.path)
        # Visible to other NFS clients at their next open; durable enough for a record that
        # only has to say "alive now" (after a power loss the host is dead anyway).
        os.fsync(self._fd)

    # --- what this host may still do -------------------------------------------------------

    def term(self) -> int:
        """A number that moves on whenever this host went ``lease_timeout`` without renewing:
        other hosts may have counted it dead since, so work claimed in an earlier term must not
        publish anything. Looked at directly (not only by the renewer thread), so that a stage
        thread that runs first after a SIGCONT already sees the gap."""
        with self._mutex:
            self._note_lapse(self._clock())
            return self._term

    def fresh(self) -> bool:
        """Whether no other host can count this one dead for at least ``lease_timeout / 2``
        more seconds; renews at once if the last renewal is older than that."""
        if self._age() >= self.lease_timeout / 2:
            self.renew()
        return not self._stop.is_set() and self._age() < self.lease_timeout / 2

    def _age(self) -> float:
        with self._mutex:
            return self._clock() - self._renewed_at

    def _note_lapse(self, now: float) -> None:
        if not self._lapsed and now - self._renewed_at >= self.lease_timeout:
            self._lapsed = True
            self._term += 1
            if self._counter == 0:
                return  # the first renewal of this connection: nothing lapsed
            logger.warning(
                "host %s did not renew its heartbeat for %.1f s: other hosts may have taken its "
                "stages over; it cancels what it runs and claims again once renewed (term %d)",
                self.host_id, now - self._renewed_at, self._term,
                extra={"host": self.host_id, "path": self.path},
            )  # fmt: skip

    def _unlock_and_close(self) -> None:
        fd, self._fd = self._fd, -1
        if _F_OFD_SETLK is None:
            with _held_here_lock:
                _held_here.discard(os.path.realpath(self.path))
        os.close(fd)  # closing the description drops its lock


class HostMonitor:
    """What this host knows of the others' liveness in one repository."""

    def __init__(
        self,
        root: str,
        lease_timeout: float,
        *,
        refresh: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``refresh``: how stale a record read earlier may be before it is read again
        (``lease_timeout / 8``, at most a second, unless given)."""
        self.directory = hosts_dir(root)
        self.lease_timeout = float(lease_timeout)
        self.refresh = min(self.lease_timeout / 8, 1.0) if refresh is None else float(refresh)
        self._clock = clock
        self._mutex = threading.Lock()
        # host id -> (what its record said, when this host first saw it say that)
        self._seen: dict[str, tuple[tuple[str, int, bool] | None, float]] = {}
        self._beats: dict[str, Heartbeat | None] = {}
        self._read_at: dict[str, float] = {}

    def heartbeat(self, host_id: str) -> Heartbeat | None:
        """The host's last whole record, read again once the last read is older than
        :attr:`refresh`: an executor asks once per image it could take over, and a record seen
        late only makes a death noticed later, never earlier."""
        now = self._clock()
        with self._mutex:
            last = self._read_at.get(host_id)
            if last is not None and now - last < self.refresh:
                return self._beats[host_id]
        beat = read_heartbeat(os.path.join(self.directory, host_id))
        with self._mutex:
            if beat is None and self._beats.get(host_id) is not None:
                beat = self._beats[host_id]  # torn while we read: the last whole one stands
            key = None if beat is None else (beat.incarnation, beat.counter, beat.released)
            seen = self._seen.get(host_id)
            if seen is None or seen[0] != key:
                self._seen[host_id] = (key, now)
            self._beats[host_id] = beat
            self._read_at[host_id] = now
        return beat

    def silent_for(self, host_id: str) -> float:
        """Seconds this host has seen ``host_id``'s record unchanged (or missing)."""
        self.heartbeat(host_id)
        with self._mutex:
            return self._clock() - self._seen[host_id][1]

    def expires_in(self, host_id: str) -> float:
        """Seconds until ``host_id`` counts as dead if its record stays as it is now."""
        return max(0.0, self.lease_timeout - self.silent_for(host_id))

    def is_dead(self, host_id: str) -> bool:
        """Whether ``host_id`` can no longer act here: it said it left, or it went silent."""
        beat = self.heartbeat(host_id)
        if beat is not None and beat.released:
            return True
        return self.silent_for(host_id) >= self.lease_timeout

    def may_take_over(self, host_id: str) -> bool:
        """Whether a claim of ``host_id`` may be taken over: it is dead, or it is alive but
        runs no executors (a restart without them releases its earlier incarnation's work)."""
        beat = self.heartbeat(host_id)
        if beat is not None and not beat.released and not beat.runs_executors:
            return True
        return self.is_dead(host_id)

    def hosts(self) -> dict[str, Heartbeat | None]:
        """Every host id that ever connected here, with its last record."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return {}
        return {n: self.heartbeat(n) for n in names if not n.startswith(".")}


def heartbeats(root: str) -> dict[str, Heartbeat | None]:
    """Each host id with a record in the repository at ``root``, and that record, once read
    (None where there is none to read: see :func:`read_heartbeat`), by host id. For tools that
    look once (``strata-log hosts``); an executor judges hosts through a :class:`HostMonitor`."""
    directory = hosts_dir(root)
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return {}
    return {name: read_heartbeat(os.path.join(directory, name)) for name in names}


def read_heartbeat(path: str) -> Heartbeat | None:
    """The heartbeat in ``path``; None where there is none to read: no file, or something
    that is not a regular file (a link, a directory, a FIFO that would block a reader forever)
    or that this process may not read. Such a host counts as silent, never as alive."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return Heartbeat.decode(os.pread(fd, RECORD_SIZE, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def _describe(beat: Heartbeat) -> str:
    return (
        f"pid {beat.pid} on {beat.hostname}, incarnation {beat.incarnation}, renewal {beat.counter}"
    )


def _lock(fd: int, path: str) -> None:
    """Take the host id's exclusive lock without waiting; BlockingIOError if it is held."""
    if _F_OFD_SETLK is not None:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(e.errno, "host id lock held", path) from e
            raise
        return
    key = os.path.realpath(path)
    with _held_here_lock:
        if key in _held_here:
            raise BlockingIOError(errno.EAGAIN, "host id lock held in this process", path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(e.errno, "host id lock held", path) from e
            raise
        _held_here.add(key)
