"""Reading a log directory without writing to it, for auditors.

:class:`engine.log.OperationLog` is for hosts: opening it creates the ``lock`` file and an
appender cuts a torn tail. An auditor's tool must leave the directory exactly as it found it, so
this reader only opens segment files read-only and checks them with the engine's own
:func:`engine.log.segments.read_header` and :func:`engine.log.scan.scan`.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from dataclasses import dataclass

from engine.errors import LogCorrupted, NotAStrataLog
from engine.log import framing, segments, store
from engine.log import read_ahead as read_ahead_module
from engine.log.framing import Record, SegmentHeader
from engine.log.read_ahead import ReadAhead, usable_cores
from engine.log.scan import FrameHashes, ScanResult, Tail, scan

# Segments are read in chunks so that memory stays bounded however large a segment grows. A
# chunk's records are all alive at once: 1 MiB of them (some 3,500) stays closer to the CPU's
# caches than 4 MiB did: replay was 5-8% faster (bench/log_replay.py).
CHUNK = 2**20


@dataclass(frozen=True, slots=True)
class TailState:
    """How the last segment ends: ``end`` is where the next appender will cut it."""

    segment: int
    end: int
    size: int

    @property
    def torn(self) -> bool:
        return self.size > self.end


class ReadOnlyLog:
    """A log directory, read and checked segment by segment, never written."""

    def __init__(
        self, directory: str, *, chunk: int = CHUNK, read_ahead: bool | None = None
    ) -> None:
        self.directory = directory
        self.chunk = chunk
        # A segment of more than one chunk is read and hashed ahead by a thread (ReadAhead);
        # by default only where a second core can run it: on one core it only adds switches.
        if read_ahead is None:
            read_ahead = usable_cores() > 1
        self.read_ahead = read_ahead and read_ahead_module.compiled_read_frames is not None
        self.numbers = segments.list_segments(directory)
        if not self.numbers:
            raise NotAStrataLog("no segment files", path=directory)
        self.headers: dict[int, SegmentHeader] = {}
        self.tail: TailState | None = None  # known once records() has run to the end

    def records(self, start: int = 1) -> Generator[Record, None, None]:
        """Every whole-transaction record with ``seq >= start``, checked as it is read.

        Raises :class:`LogCorrupted` at the first damage. Segments that end before ``start``
        are not scanned: the next segment's header carries the chain on.
        """
        with contextlib.closing(self.batches(start)) as batches:
            for batch in batches:
                yield from batch

    def batches(self, start: int = 1) -> Generator[list[Record], None, None]:
        """The records of :meth:`records`, in lists of whole transactions as they are read.

        For callers that go through many records: a list costs less per record than a step of
        a generator.
        """
        seq, last_hash = 1, framing.ZERO_HASH
        chained = True  # (seq, last_hash) come from the records read, not from a header
        last = self.numbers[-1]
        for number in self.numbers:
            header, data_start = self._header(number)
            if chained and (header.first_seq, header.prev_hash) != (seq, last_hash):
                raise LogCorrupted(
                    f"segment starts at sequence {header.first_seq} but the chain continues at "
                    f"{seq} (a segment was removed, reordered or replaced)",
                    segment=number,
                    offset=0,
                )
            seq, last_hash = header.first_seq, header.prev_hash
            chained = (
                number == last or start <= seq or self._header(number + 1)[0].first_seq > start
            )
            if not chained:
                continue
            path = segments.segment_path(self.directory, number)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                seq, last_hash = yield from self._segment(
                    fd, number, data_start, seq, last_hash, start=start, final=number == last
                )
            finally:
                os.close(fd)

    def _header(self, number: int) -> tuple[SegmentHeader, int]:
        path = segments.segment_path(self.directory, number)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header, data_start = segments.read_header(fd, path, number)
        except NotAStrataLog as e:
            if number == 1:
                raise
            # A later segment of a log that is otherwise a Strata log is damage, not a wrong path.
            raise LogCorrupted(
                f"segment header is bad ({e.detail})", segment=number, offset=0
            ) from e
        finally:
            os.close(fd)
        self.headers[number] = header
        return header, data_start

    def _segment(
        self,
        fd: int,
        number: int,
        pos: int,
        seq: int,
        last_hash: bytes,
        *,
        start: int,
        final: bool,
    ) -> Generator[list[Record], None, tuple[int, bytes]]:
        size = os.fstat(fd).st_size
        ahead = ReadAhead(fd, pos, size, self.chunk) if self._ahead(pos, size) else None
        try:
            return (
                yield from self._chunks(
                    fd, number, pos, size, seq, last_hash, ahead, start=start, final=final
                )
            )
        finally:
            if ahead is not None:
                ahead.close()  # before the caller closes ``fd``

    def _ahead(self, pos: int, size: int) -> bool:
        return self.read_ahead and size - pos > self.chunk

    def _chunks(
        self,
        fd: int,
        number: int,
        pos: int,
        size: int,
        seq: int,
        last_hash: bytes,
        ahead: ReadAhead | None,
        *,
        start: int,
        final: bool,
    ) -> Generator[list[Record], None, tuple[int, bytes]]:
        want = self.chunk
        held: list[Record] = []  # checked records of a transaction that goes on past ``pos``
        committed = (pos, seq, last_hash)  # where the last whole transaction ends, and the chain
        while pos < size:
            asked = min(want, size - pos)
            ready = ahead.take(pos, asked) if ahead is not None else None
            if ready is not None:
                buf, hashes = ready.buf, ready
            else:
                # Anything but the next plain chunk (a chunk read again larger, a torn tail, an
                # error ahead) is read here, as it always was: the read-ahead is not needed.
                if ahead is not None:
                    ahead.close()
                    ahead = None
                buf, hashes = os.pread(fd, asked, pos), None
            if len(buf) < asked:
                size = pos + len(buf)  # an appender cut a torn tail while we read
            whole = pos + len(buf) >= size
            result, damage = _scan_until_damage(buf, pos, number, seq, last_hash, hashes)
            if damage is not None:
                # Whether a frame is torn depends on the bytes up to the end of the file, so a
                # chunk's verdict on damage only counts once the chunk reaches that end.
                if not whole:
                    want *= 2
                    continue
                if final:
                    buf = self._read_again(number, pos)
                    size = pos + len(buf)
                    result, damage = _scan_until_damage(buf, pos, number, seq, last_hash)
            if result.records:
                batch = held + result.records
                held = []
                committed = (result.end, result.next_seq, result.last_hash)
                if start > batch[0].seq:
                    batch = batch[start - batch[0].seq :]
                if batch:
                    yield batch
            if damage is not None:
                raise damage
            if result.tail is Tail.TORN and whole:
                end, seq, last_hash = committed
                if not final:
                    raise LogCorrupted(
                        "a segment that was rolled over ends in a torn record",
                        segment=number,
                        offset=end,
                    )
                self.tail = TailState(number, end, size)
                return seq, last_hash
            # The next chunk goes on after the last whole frame, with the transaction read so
            # far held; a chunk too small for even one frame is read again larger.
            pending = result.pending
            held += pending.records
            want = want * 2 if pending.end == pos else self.chunk
            pos, seq, last_hash = pending.end, pending.next_seq, pending.last_hash
        if final:
            self.tail = TailState(number, pos, pos)
        return seq, last_hash

    def _read_again(self, number: int, pos: int) -> bytes:
        """The last segment from ``pos``, read once no appender is writing (ADR 0002, Reading).

        On NFS another host's append in progress can show its bytes out of order, which looks
        like damage. The shared lock needs the ``lock`` file: when it is missing or not ours to
        open, read without it rather than create it.
        """
        lock_path = os.path.join(self.directory, segments.LOCK_NAME)
        if not os.path.isfile(lock_path) or not os.access(lock_path, os.R_OK | os.W_OK):
            return _read_from(segments.segment_path(self.directory, number), pos)
        lock = store.segments_lock(self.directory)
        try:
            lock.acquire(shared=True)
            return _read_from(segments.segment_path(self.directory, number), pos)
        finally:
            lock.close()


def _read_from(path: str, pos: int) -> bytes:
    # Opened afresh: NFS revalidates a file's cached data on open.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, max(os.fstat(fd).st_size - pos, 0), pos)
    finally:
        os.close(fd)


def _scan_until_damage(
    buf: bytes,
    base: int,
    number: int,
    seq: int,
    last_hash: bytes,
    hashes: FrameHashes | None = None,
) -> tuple[ScanResult, LogCorrupted | None]:
    """Scan ``buf``; on damage, also the whole transactions before it, so none is left unshown."""
    try:
        return scan(buf, base, number, seq, last_hash, hashes), None
    except LogCorrupted as damage:
        good = buf[: damage.offset - base]
        return scan(good, base, number, seq, last_hash), damage


def leftovers(directory: str) -> tuple[list[str], list[str]]:
    """Cut-off torn tails kept for auditors, and temporaries of an unfinished roll-over."""
    kept_dir = os.path.join(directory, store.TORN_DIR)
    kept = sorted(os.listdir(kept_dir)) if os.path.isdir(kept_dir) else []
    temporaries = sorted(
        name
        for name in os.listdir(directory)
        if name.startswith(".segment-") and name.endswith(".tmp")
    )
    return kept, temporaries
