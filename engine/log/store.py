"""The per-repository operation log: durable appends, reads by position, catching up with others.

One :class:`OperationLog` per log directory per process, shared by that process's threads.
Appenders are serialized across processes by an OFD byte-range lock on ``lock``; inside a process
they go through a group commit (engine/log/group_commit.py: one leader writes every waiting
transaction with one ``write`` and one ``fdatasync``), yet each call returns only once its own
records are durable. The index (sequence -> segment offset, aggregate -> versions) lives in
memory and is caught up by reading only the bytes appended since the last look.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from engine.errors import (
    CommitUnknown,
    InvalidParameter,
    LogClosed,
    LogCorrupted,
    LogMissing,
    NotAStrataLog,
    StrataError,
    storage_error,
)
from engine.log import framing, segments, space
from engine.log.batch import (
    AggregateEntry,
    EventToAppend,
    FramedBatch,
    check_event,
    frame_batch,
    index_batch,
)
from engine.log.framing import Record, SegmentHeader
from engine.log.group_commit import GroupCommit, Request
from engine.log.locking import RangeLock
from engine.log.scan import ScanResult, Tail, gc_paused, scan
from engine.log.segments import SegmentInfo
from engine.log.witness import WitnessWriter, read_witnesses

logger = logging.getLogger("engine.log")
DEFAULT_SEGMENT_SIZE = 64 * 2**20
DEFAULT_COMMIT_DELAY = 0.0005  # seconds a group-commit leader may wait for concurrent callers
WITNESS_INTERVAL = 0.05  # seconds: the most often an appender rewrites its witness
TORN_DIR = "torn"  # cut-off tails are kept here for auditors, never read as events
_MAX_HOST_ID = 255


class Wakeable(Protocol):
    """Anything with ``set()``: a ``threading.Event``, or a follower's wake-up counter."""

    def set(self) -> None: ...


def _check_host_id(host_id: object) -> str:
    # Printable: a newline would make "host-a\n" a second host beside "host-a", and forge a
    # line in the tools' output.
    if (
        not isinstance(host_id, str)
        or not host_id
        or len(host_id) > _MAX_HOST_ID
        or not host_id.isprintable()
    ):
        raise InvalidParameter(
            f"a non-empty string of at most {_MAX_HOST_ID} printable characters (no newline), "
            f"not {host_id!r}",
            name="host_id",
        )
    return host_id


class OperationLog:
    """An open log directory. Use :meth:`create` for a new one, :meth:`open` for an existing one."""

    def __init__(
        self,
        directory: str,
        host_id: str,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        clock: Callable[[], int] = time.time_ns,
        commit_delay: float = DEFAULT_COMMIT_DELAY,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.host_id = _check_host_id(host_id)
        if not isinstance(segment_size, int) or segment_size < 4096:
            raise InvalidParameter("at least 4096 bytes", name="segment_size")
        self._segment_size = segment_size
        self._clock = clock
        self._mutex = threading.RLock()  # guards the index and the tail position
        self._closed = False
        # Set when a failed write could not be undone: the write handle is opened anew and
        # whatever the failed write left past ``_end`` is read again, under the lock, before
        # the next append (engine/log/space.py says why such a write can still be committed).
        self._suspect = False
        self._segments: list[SegmentInfo] = []
        self._first_seqs: list[int] = []
        self._read_fds: dict[int, int] = {}
        self._write_fd = -1  # opened at the first append: a reader may have read-only storage
        self._reserved_end = 0  # space is allocated for the last segment up to here
        self._end = 0  # offset just past the last whole transaction in the last segment
        self._next_segment_path = ""  # the one whose appearance ends the last segment
        self._next_seq = 1
        self._last_hash = framing.ZERO_HASH
        self._offsets = array("Q")  # frame offset of sequence n at index n - 1
        # Per aggregate: its sequence numbers, and its version last (one dict lookup per record
        # on replay, where a UUID key costs a Python-level __hash__).
        self._aggregates: dict[bytes | str, AggregateEntry] = {}
        self._listeners: set[Wakeable] = set()
        self._group: GroupCommit[Sequence[EventToAppend]] = GroupCommit(self._commit, commit_delay)
        self._packer = framing.new_packer()  # used by the committing thread, under _mutex
        self._swept = False
        self._witness = WitnessWriter(self.directory, self.host_id)
        self._witness_pending = False  # committed records the witness does not name yet
        self._witness_due = 0.0  # monotonic time from which appends write it again
        try:
            identity = os.stat(self.directory)
        except FileNotFoundError as e:
            raise NotAStrataLog("no such directory", path=self.directory) from e
        except OSError as e:
            raise storage_error(e, "Opening the log", self.directory) from e
        if not os.path.isdir(self.directory):
            raise NotAStrataLog("not a directory", path=self.directory)
        # What a later append checks to notice that log/ was removed or replaced meanwhile.
        self._identity = (identity.st_dev, identity.st_ino)
        if not segments.list_segments(self.directory):
            raise NotAStrataLog("no segment files", path=self.directory)
        # Created at the first append, so that opening a directory that turns out not to be a
        # sound log leaves it exactly as it was.
        self._lock: RangeLock | None = None
        self._shared_lock: RangeLock | None = None  # readers' look past the committed end
        try:
            self._catch_up(locked=False)
            self._check_witnesses()
        except OSError as e:
            self.close()
            raise storage_error(e, "Reading the log", self.directory) from e
        except BaseException:
            self.close()
            raise

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, host_id: str, **options: object) -> OperationLog:
        """Make a new, empty log in ``directory`` (created if missing; must hold no log)."""
        _check_host_id(host_id)
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        try:
            os.mkdir(directory, 0o755)
            segments.fsync_directory(parent)
        except FileExistsError:
            if segments.list_segments(directory):
                raise InvalidParameter("it already holds a log", name="directory") from None
        except FileNotFoundError as e:
            raise InvalidParameter(f"{parent} does not exist", name="directory") from e
        lock = segments_lock(directory)
        try:
            with lock:
                if not segments.list_segments(directory):
                    segments.create_segment(
                        directory,
                        SegmentHeader(
                            framing.VERSION, 1, 1, framing.ZERO_HASH, time.time_ns(), host_id
                        ),
                    )
        finally:
            lock.close()
        return cls(directory, host_id, **options)  # type: ignore[arg-type]

    @classmethod
    def open(cls, directory: str, host_id: str, **options: object) -> OperationLog:
        return cls(directory, host_id, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
            if self._witness_pending:
                self._write_witness()
            self._close_write_fd()
            for lock in (self._lock, self._shared_lock):
                if lock is not None:
                    lock.close()
            self._witness.close()
        self._notify()

    def __enter__(self) -> OperationLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- appending ------------------------------------------------------------------------

    def append(self, events: Sequence[EventToAppend]) -> list[int]:
        """Append one transaction; return its sequence numbers once they are durable.

        Raises :class:`ConcurrencyConflict` (and appends nothing) when an aggregate's version
        moved: each event must carry the next version of its aggregate.
        """
        if not events:
            return []
        for event in events:
            check_event(event)
        return self._group.submit(events)

    def _commit(self, batch: list[Request[Sequence[EventToAppend]]]) -> None:
        """Write one group's transactions; a request refused or failed gets its ``error``."""
        try:
            with self._mutex:
                self._check_open()
                try:
                    self._check_still_there()
                    if self._lock is None:
                        self._lock = segments_lock(self.directory)
                    self._lock.acquire()
                    try:
                        self._append_locked(batch)
                    finally:
                        self._lock.release()
                except OSError as e:
                    raise storage_error(e, "Appending to the log in", self.directory) from e
        finally:
            self._notify()

    def _append_locked(self, batch: list[Request[Sequence[EventToAppend]]]) -> None:
        if self._suspect:
            self._close_write_fd()  # a handle whose write failed is not trusted again
            self._suspect = False
        self._catch_up(locked=True)
        if not self._swept:
            # Once per appender: a crash mid roll-over leaves a temporary segment.
            segments.remove_stale_temporaries(self.directory)
            self._swept = True
        if self._end >= self._segment_size:
            self._roll_over()
        self._write_batch(batch)

    def _check_still_there(self) -> None:
        """Refuse to append into a log directory that was removed or replaced since it was
        opened (its records would go to files nobody reads), or whose last segment was."""
        try:
            st = os.stat(self.directory)
        except FileNotFoundError as e:
            raise LogMissing("the directory is gone", path=self.directory) from e
        if (st.st_dev, st.st_ino) != self._identity:
            raise LogMissing("another directory is there now", path=self.directory)
        if self._segments:
            fd = self._read_fds[self._segments[-1].number]
            if os.fstat(fd).st_nlink == 0:
                raise LogMissing(
                    f"segment {self._segments[-1].number} was removed", path=self.directory
                )

    def _write_batch(self, batch: list[Request[Sequence[EventToAppend]]]) -> None:
        """Frame every acceptable request of ``batch`` (engine/log/batch.py), then write and
        sync them all at once; a refused request gets its ``error`` and appends nothing."""
        framed = frame_batch(
            batch,
            seq=self._next_seq,
            prev=self._last_hash,
            base=self._end,
            host_id=self.host_id,
            now=self._clock(),
            versions=self._aggregates,
            pack=self._packer.pack,
        )
        out = framed.out
        if not out:
            return
        fd = self._writable()
        if self._end + len(out) > self._reserved_end:
            # Allocated before a byte is written, so that a full filesystem fails the append
            # here, cleanly, rather than with a write that stops halfway.
            self._reserved_end = space.reserve(fd, self._end, len(out), self._last_segment_path())
        try:
            written = os.pwrite(fd, out, self._end)
        except OSError as e:  # pwrite fails only when it wrote nothing
            raise storage_error(e, "Appending to", self._last_segment_path()) from e
        try:
            if written != len(out):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(out)} bytes")
            os.fdatasync(fd)
        except OSError as e:
            try:
                space.undo_write(fd, self._end, e, self._last_segment_path())
            except CommitUnknown as unknown:
                self._suspect = True  # until _settle has read back what the write left
                logger.warning(
                    "a failed append to %s could not be cut off (%s): reading it back",
                    self.directory, unknown.detail, extra={"path": self.directory},
                )  # fmt: skip
                self._settle(framed, e, unknown)
                return
        except BaseException:
            self._suspect = True  # interrupted between the write and its sync: read it again
            raise
        self._offsets.extend(framed.offsets)
        index_batch(framed.accepted, self._aggregates)  # self._index, from the claims
        self._end += len(out)
        self._next_seq, self._last_hash = framed.next_seq, framed.last_hash
        self._witness_pending = True
        if time.monotonic() >= self._witness_due:
            self._write_witness()

    def _write_witness(self) -> None:
        """Write this host's witness of what it committed (engine/log/witness.py), at most
        every ``WITNESS_INTERVAL`` from appends: the write costs a busy appender about 9 us a
        commit (the witness's inode joins the sync's journal commit on ext4). What an append
        leaves unwitnessed is written by the next append after the interval, by the next
        :meth:`refresh` after it (a connected engine's followers refresh every poll), or at
        :meth:`close`."""
        self._witness_pending = False
        self._witness_due = time.monotonic() + WITNESS_INTERVAL
        self._witness.write(self._next_seq - 1, self._last_hash)

    def _settle(self, framed: FramedBatch, error: OSError, unknown: CommitUnknown) -> None:
        """A write failed and could not be cut off: read back, still under the lock, what it
        left, and sync it. Whole transactions are committed then (any reader takes them so),
        and their callers get their sequence numbers; the rest was cut off as a torn tail, and
        their callers get the error. Raises ``unknown`` if the storage can do neither."""
        self._close_write_fd()
        try:
            self._catch_up(locked=True)
            os.fsync(self._writable())
        except (OSError, StrataError):
            raise unknown from error
        self._suspect = False
        committed = self._next_seq - 1
        for request, first, claims in framed.accepted:
            last = first + len(claims) - 1
            if last <= committed:
                request.seqs = list(range(first, last + 1))
            else:
                request.error = storage_error(error, "Appending to", self._last_segment_path())
        self._write_witness()

    def _writable(self) -> int:
        if self._write_fd < 0:
            path = self._last_segment_path()
            self._write_fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._reserved_end = 0
        return self._write_fd

    def _close_write_fd(self) -> None:
        if self._write_fd >= 0:
            fd, self._write_fd = self._write_fd, -1
            # A failed close of a handle we no longer trust changes nothing.
            with contextlib.suppress(OSError):
                os.close(fd)

    def _last_segment_path(self) -> str:
        return segments.segment_path(self.directory, self._segments[-1].number)

    def _roll_over(self) -> None:
        number = self._segments[-1].number + 1
        segments.create_segment(
            self.directory,
            SegmentHeader(
                framing.VERSION,
                number,
                self._next_seq,
                self._last_hash,
                self._clock(),
                self.host_id,
            ),
        )
        self._open_segment(number)

    # --- catching up ----------------------------------------------------------------------

    def refresh(self) -> int:
        """Read what other processes appended since the last look; return the last sequence."""
        with self._mutex:
            self._check_open()
            before = self._next_seq
            self._catch_up(locked=False)
            grew = self._next_seq != before
            if self._witness_pending and time.monotonic() >= self._witness_due:
                self._write_witness()
        if grew:
            self._notify()
        return self._next_seq - 1

    def _catch_up(self, *, locked: bool) -> None:
        if not self._segments:
            numbers = segments.list_segments(self.directory)
            self._open_segment(numbers[0])
        while True:
            info = self._segments[-1]
            fd = self._read_fds[info.number]
            # Looked at before reading: only the last segment may ever be cut, and under the
            # lock no one can roll over between this look and the cut.
            final = os.access(self._next_segment_path, os.F_OK)  # no exception to build
            size = os.fstat(fd).st_size
            if size < self._end:
                # This host read (or wrote) records up to _end: they were committed. Bytes
                # gone from under them are damage, never a torn tail to cut.
                raise LogCorrupted(
                    f"the segment is {size} bytes long but held committed records up to byte "
                    f"{self._end} (sequence {self._next_seq - 1}): it was cut or replaced",
                    segment=info.number,
                    offset=size,
                )
            if size > self._end:
                self._scan_tail(info, fd, size, locked=locked, may_cut=not final)
            if not final:
                return
            # A later segment exists, so this one is final: it must end with a whole record.
            size = os.fstat(fd).st_size
            if size > self._end:
                self._scan_tail(info, fd, size, locked=locked, may_cut=False)
            if os.fstat(fd).st_size != self._end:
                raise LogCorrupted(
                    "a segment that was rolled over ends in a torn record",
                    segment=info.number,
                    offset=self._end,
                )
            self._open_segment(info.number + 1)

    def _scan_tail(
        self, info: SegmentInfo, fd: int, size: int, *, locked: bool, may_cut: bool
    ) -> None:
        if not locked:
            size = self._committed_size(fd, size)
            if size <= self._end:
                return
        buf = os.pread(fd, size - self._end, self._end)
        result = scan(buf, self._end, info.number, self._next_seq, self._last_hash)
        with gc_paused():  # indexing a long log allocates much and frees nothing
            self._accept(result)
        if result.tail is Tail.TORN and locked and may_cut:
            self._cut_torn_tail(info, fd, result.end)

    def _committed_size(self, fd: int, size: int) -> int:
        """How far the segment holds only finished appends: its size while no appender
        holds the lock. An append in progress may still fail and be undone, so a reader must
        not take its records as committed (and on NFS taking the lock also makes the client
        read the bytes afresh). Bytes before that size never change afterwards."""
        if self._shared_lock is None:
            lock_path = os.path.join(self.directory, segments.LOCK_NAME)
            try:
                self._shared_lock = RangeLock(lock_path, readonly=True)
            except FileNotFoundError:
                return size  # no appender has ever run here: nothing can be in progress
        self._shared_lock.acquire(shared=True)
        try:
            return os.fstat(fd).st_size
        finally:
            self._shared_lock.release()

    def _accept(self, result: ScanResult) -> None:
        self._index(result.records, result.offsets)
        self._end = result.end
        self._next_seq, self._last_hash = result.next_seq, result.last_hash

    def _cut_torn_tail(self, info: SegmentInfo, fd: int, end: int) -> None:
        # A torn tail is what a crash mid-append leaves, and that append was never
        # acknowledged. If a witness says records past ``end`` were committed, the bytes
        # were lost after the fact: damage, and nothing is cut.
        self._check_witnesses(torn_at=end)
        torn = os.pread(fd, os.fstat(fd).st_size - end, end)
        logger.warning(
            "cutting a torn tail of %d bytes (a crash mid-append) from segment %d at byte %d; "
            "a copy is kept in %s",
            len(torn), info.number, end, TORN_DIR, extra={"path": self.directory},
        )  # fmt: skip
        keep = os.path.join(self.directory, TORN_DIR)
        os.makedirs(keep, exist_ok=True)
        name = os.path.join(keep, f"{segments.segment_name(info.number)}.at-{end}.{time.time_ns()}")
        with open(name, "wb") as f:
            f.write(torn)
            f.flush()
            os.fsync(f.fileno())
        segments.fsync_directory(keep)
        write_fd = self._writable()
        os.ftruncate(write_fd, end)
        os.fsync(write_fd)

    def _open_segment(self, number: int) -> None:
        path = segments.segment_path(self.directory, number)
        fd = segments.open_segment(path, number)
        try:
            header, data_start = segments.read_header(fd, path, number)
        except NotAStrataLog as e:
            os.close(fd)
            if number == 1:
                raise
            # Segment 1 said this is a Strata log: a later bad header is damage, not a stranger.
            raise LogCorrupted(
                f"segment header unreadable ({e.detail})", segment=number, offset=0
            ) from e
        except BaseException:
            os.close(fd)
            raise
        if header.first_seq != self._next_seq or header.prev_hash != self._last_hash:
            os.close(fd)
            raise LogCorrupted(
                f"segment starts at sequence {header.first_seq} but the chain continues at "
                f"{self._next_seq} (a segment was removed, reordered or replaced)",
                segment=number,
                offset=0,
            )
        self._read_fds[number] = fd
        self._segments.append(SegmentInfo(number, header.first_seq, data_start))
        self._next_segment_path = segments.segment_path(self.directory, number + 1)
        self._first_seqs.append(header.first_seq)
        self._end = data_start
        self._close_write_fd()  # the next append opens the new last segment

    def _index(self, records: Sequence[Record], offsets: Sequence[int]) -> None:
        self._offsets.extend(offsets)
        aggregates = self._aggregates
        for record in records:
            entry = aggregates.get(record.originator_key)
            if entry is None:
                aggregates[record.originator_key] = [record.originator_version, [record.seq]]
            else:
                entry[0] = record.originator_version
                entry[1].append(record.seq)

    def _version_by_key(self, key: bytes | str) -> int | None:
        entry = self._aggregates.get(key)
        return None if entry is None else entry[0]

    # --- reading --------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The last sequence number this process has seen (call :meth:`refresh` to look again)."""
        return self._next_seq - 1

    def end_position(self) -> tuple[int, int]:
        """The segment number and byte offset just past the last record this process read."""
        with self._mutex:
            return self._segments[-1].number, self._end

    def version_of(self, originator_id: uuid.UUID | str) -> int | None:
        with self._mutex:
            return self._version_by_key(framing.key_of(originator_id))

    def read(
        self, start: int = 1, stop: int | None = None, limit: int | None = None
    ) -> list[Record]:
        """Records with ``start <= seq <= stop``, at most ``limit`` of them, in order."""
        with self._mutex:
            self._check_open()
            last = self._next_seq - 1
            if stop is None or stop > last:
                stop = last
            start = max(start, 1)
            if limit is not None:
                stop = min(stop, start + limit - 1)
            out: list[Record] = []
            while start <= stop:
                seg_index = bisect.bisect_right(self._first_seqs, start) - 1
                seg_last = (
                    self._first_seqs[seg_index + 1] - 1
                    if seg_index + 1 < len(self._segments)
                    else last
                )
                upto = min(stop, seg_last)
                out.extend(self._read_run(seg_index, start, upto))
                start = upto + 1
            return out

    def iter_records(self, start: int = 1, batch: int = 4096) -> Iterator[Record]:
        """Every record from ``start`` to the last seen, read in batches."""
        while True:
            chunk = self.read(start, limit=batch)
            if not chunk:
                return
            yield from chunk
            start = chunk[-1].seq + 1

    def events_of(
        self,
        originator_id: uuid.UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> list[Record]:
        """The records of one aggregate, filtered by version, as eventsourcing's recorders do."""
        with self._mutex:
            self._check_open()
            entry = self._aggregates.get(framing.key_of(originator_id))
            seqs: list[int] = [] if entry is None else entry[1]
            found: list[Record] = []
            if limit is not None and limit <= 0:
                return found
            for seq in reversed(seqs) if desc else seqs:
                record = self._read_run(bisect.bisect_right(self._first_seqs, seq) - 1, seq, seq)[0]
                version = record.originator_version
                if (gt is not None and version <= gt) or (lte is not None and version > lte):
                    continue
                found.append(record)
                if limit is not None and len(found) >= limit:
                    break
            return found

    def _read_run(self, seg_index: int, first: int, last: int) -> list[Record]:
        """Decode records ``first..last`` that lie in one segment (checksums checked again)."""
        info = self._segments[seg_index]
        begin = self._offsets[first - 1]
        end = (
            self._offsets[last]
            if last < self._next_seq - 1 and last + 1 < self._first_seq_after(seg_index)
            else None
        )
        fd = self._read_fds[info.number]
        if end is None:
            end = self._segment_end(seg_index)
        buf = os.pread(fd, end - begin, begin)
        records: list[Record] = []
        pos, unpack = 0, framing.FRAME_HEADER.unpack_from
        while len(records) < last - first + 1:
            length, payload_crc, _ = unpack(buf, pos)
            payload = buf[
                pos + framing.FRAME_HEADER_SIZE : pos + framing.FRAME_HEADER_SIZE + length
            ]
            if framing.crc(payload) != payload_crc:
                raise LogCorrupted(
                    "record checksum mismatch on re-read", segment=info.number, offset=begin + pos
                )
            records.append(framing.decode_payload(payload))
            pos += framing.FRAME_HEADER_SIZE + length
        return records

    def _first_seq_after(self, seg_index: int) -> int:
        if seg_index + 1 < len(self._first_seqs):
            return self._first_seqs[seg_index + 1]
        return self._next_seq

    def _segment_end(self, seg_index: int) -> int:
        if seg_index == len(self._segments) - 1:
            return self._end
        return os.fstat(self._read_fds[self._segments[seg_index].number]).st_size

    # --- waking readers -------------------------------------------------------------------

    def listen(self, event: Wakeable) -> None:
        """``event`` is set whenever this process appends or sees new records."""
        self._listeners.add(event)

    def unlisten(self, event: Wakeable) -> None:
        self._listeners.discard(event)

    def _notify(self) -> None:
        for event in list(self._listeners):
            event.set()

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosed(path=self.directory)

    def _check_witnesses(self, torn_at: int | None = None) -> None:
        """Raise :class:`LogCorrupted` if a host witnessed a committed record that the log
        no longer holds as it was (engine/log/witness.py)."""
        witnesses = read_witnesses(self.directory)
        if torn_at is None and any(w.seq >= self._next_seq for w in witnesses):
            # Not under the lock: the witness may name an append that finished after we last
            # looked at the log's end. Look again; a record committed is there now.
            self._catch_up(locked=False)
        last = self._next_seq - 1
        for witness in witnesses:
            if witness.seq > last:
                tear = "" if torn_at is None else ", then a torn record"
                raise LogCorrupted(
                    f"host {witness.host_id!r} committed records up to sequence {witness.seq}, "
                    f"but the log holds only {last}{tear}: the log was cut; nothing was cut "
                    "or appended",
                    segment=self._segments[-1].number,
                    offset=self._end,
                )
            if witness.seq >= 1 and self._hash_of(witness.seq) != witness.hash:
                seg = bisect.bisect_right(self._first_seqs, witness.seq) - 1
                raise LogCorrupted(
                    f"host {witness.host_id!r} committed record {witness.seq} with another "
                    "chain hash: the log was replaced or rewritten",
                    segment=self._segments[seg].number,
                    offset=self._offsets[witness.seq - 1],
                )

    def _hash_of(self, seq: int) -> bytes:
        """The chain hash of record ``seq`` (1 <= seq <= last): the next one's prev_hash."""
        if seq == self._next_seq - 1:
            return self._last_hash
        return self.read(seq + 1, seq + 1)[0].prev_hash


def segments_lock(directory: str) -> RangeLock:
    return RangeLock(os.path.join(directory, segments.LOCK_NAME))
