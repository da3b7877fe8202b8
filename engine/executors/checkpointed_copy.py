"""A copy that records where its data is durable as it goes, and can resume from there.

One loop for both copies a stage makes (docs/adr/0032-resumable-copies.md): a full copy into a
new file, and an incremental one (``base`` given) into a qcow2 overlay of ``base`` that must
hold only what differs from it (ADR 0004). The source is read through its chain
(engine/formats/qemu/image_io.py); each of its blocks is compared, 64 KiB cluster by cluster,
with what the target already reads there (zeroes for a new file, ``base``'s bytes for an
overlay), and only the clusters that differ are written: zeroes as ``write_zeroes`` (no data
cluster allocated), anything else as data. Every byte, zeroes included, goes through a
:class:`~engine.formats.qemu.digests.ChunkHasher`, so the copy of an immutable volume has its
digest when it ends, without reading anything twice.

At each chunk boundary of the digest (at most 256 per volume: the checkpoint interval) the
writer is flushed (data and qcow2 tables durable) and ``checkpoint`` is told the offset and the
hashes of the chunks done since the last one. A later attempt that finds the file of the one
that recorded a checkpoint starts at its offset with its hashes: what lies before is durable
and the source is immutable; what lies after may hold part of what the killed attempt wrote
beyond, which is the same bytes, written again. How a stage finds that file and takes it over
is engine/executors/copy_resume.py.

Imports: ``engine.formats``; the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from engine.formats.qemu.digests import HASH_BYTES, ChunkHasher, VolumeDigest, chunk_size_for
from engine.formats.qemu.image_io import Extent, ImageReader, ImageWriter

CLUSTER = 64 << 10  # the granularity of comparisons and writes: qcow2's default cluster
_ZEROES = bytes(CLUSTER)


@dataclass(frozen=True)
class Reached:
    """A checkpoint: the target's bytes before ``offset`` are durable. ``chunks``: the hashes
    of the chunks completed since the previous checkpoint of this attempt (for its first one,
    since the volume's start); ``written``: bytes the target's writer wrote so far."""

    offset: int
    percent: int
    chunks: bytes
    written: int


@dataclass(frozen=True)
class Copied:
    """What a finished copy produced: the digest of the guest-visible bytes, and the bytes its
    writer wrote (this attempt's, as the kernel counted them)."""

    digest: VolumeDigest | None  # None: not asked for, or the resumed-from hashes were not kept
    written: int


def copy_image(
    reader: ImageReader,
    writer: ImageWriter,
    *,
    base: ImageReader | None = None,
    start: int = 0,
    done_chunks: bytes = b"",
    checkpoint: Callable[[Reached], None],
    stop: Callable[[], None] = lambda: None,
    first_write: Callable[[], None] = lambda: None,
    rate: int = 0,
    digest: bool = True,
) -> Copied:
    """Copy ``reader``'s guest-visible bytes from ``start`` into ``writer``'s image, which
    reads as zeroes there (a new file) or as ``base`` reads (an overlay of ``base``), or as
    the source where an earlier attempt of this copy wrote. ``start`` is a checkpoint's
    offset and ``done_chunks`` the hashes recorded up to it. ``stop`` raises to end the copy
    (asked before each block); ``first_write`` is called once, before anything is written;
    ``rate``: bytes of data read a second at most (0: no limit). ``digest``: hash the bytes
    (a copy that makes a snapshot's volume: docs/adr/0031); a disk's copy does not pay for it.

    A checkpoint is recorded at a chunk boundary when something may have been written since
    the last one: a sparse volume's empty chunks cost no log append and no flush."""
    size = reader.size
    if writer.size != size:
        raise ValueError(f"sizes differ: source {size}, target {writer.size}")
    chunk = chunk_size_for(size)
    if start % chunk or not 0 <= start <= size:
        raise ValueError(f"{start} is not a checkpoint of a copy of {size} bytes")
    # Without every earlier chunk's hash (an attempt that did not hash), the digest is not
    # this copy's to give: the caller reads the volume for it if it wants one.
    hashing_on = digest and len(done_chunks) == start // chunk * HASH_BYTES
    hasher: ChunkHasher | _NoHasher = ChunkHasher(size, chunk, start) if hashing_on else _NoHasher()
    if not hashing_on:
        done_chunks = b""
    chunks = bytearray(done_chunks)  # every chunk's hash so far
    told = 0  # of which the checkpoints recorded so many bytes (none yet, for this attempt)
    under = _Under(base)
    # A block is hashed in a thread of its own while it is written (sha256 and the socket
    # release the GIL). A checkpoint is recorded before the next chunk is written, so a kill
    # costs at most the chunk it lands in: recording it beside the next chunk gained nothing
    # measurable, and would make that two.
    hashing = ThreadPoolExecutor(1, thread_name_prefix="strata-copy-hash")
    hashed: Future[None] | None = None

    def reach(offset: int) -> None:
        nonlocal told
        writer.flush()  # durable before the log says so
        if hashed is not None:
            hashed.result()
        chunks.extend(hasher.take())
        percent = offset * 100 // size if size else 100
        reached = Reached(offset, percent, bytes(chunks[told:]), _written(writer))
        told = len(chunks)
        checkpoint(reached)  # raises if the claim moved on: the copy ends there

    dirty = False  # something may have been written since the last checkpoint
    try:
        started = False
        pace = _Pace(rate, stop)
        position = start
        for offset, piece in reader.blocks(start, size):
            stop()
            if not started:
                started = True
                first_write()
            length = piece if isinstance(piece, int) else len(piece)
            done = 0
            while done < length:
                # Up to the next chunk boundary at most: a checkpoint lies between two parts.
                at = offset + done
                n = min(length - done, chunk - at % chunk)
                data = None if isinstance(piece, int) else piece[done : done + n]
                if data is None:
                    hashed = hashing.submit(hasher.zeroes, n)
                else:
                    hashed = hashing.submit(hasher.update, data)
                _write_differences(writer, at, data, under.read(at, n))
                dirty = dirty or data is not None or base is not None
                # The block's memory is the reader's again once the next one is asked for.
                hashed.result()
                if data is not None:
                    pace.passed(n)  # written, not yet checkpointed: where a kill costs most
                done += n
                position = at + n
                if dirty and (position % chunk == 0 or position == size):
                    reach(position)
                    dirty = False
        if position != size:
            raise ValueError(f"the source's extents end at {position}, not at {size}")
        if not started:
            reach(size)  # nothing was left to copy: the last checkpoint still says so
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
    if hashing_on:
        chunks.extend(hasher.take())
        return Copied(VolumeDigest(size, chunk, bytes(chunks)), _written(writer))
    return Copied(None, _written(writer))


class _NoHasher:
    """A copy that records no digest hashes nothing."""

    def update(self, data: object) -> None:
        pass

    def zeroes(self, n: int) -> None:
        pass

    def take(self) -> bytes:
        return b""


class _Pace:
    """Keeps a copy under ``rate`` bytes a second, asking ``stop`` while it waits."""

    def __init__(self, rate: int, stop: Callable[[], None]) -> None:
        self._rate = rate
        self._stop = stop
        self._bytes = 0
        self._since = time.monotonic()

    def passed(self, n: int) -> None:
        if self._rate <= 0:
            return
        self._bytes += n
        due = self._since + self._bytes / self._rate
        while (left := due - time.monotonic()) > 0:
            self._stop()
            time.sleep(min(left, 0.05))


class _Under:
    """What the target reads where the copy has not written: ``base``'s bytes, or zeroes."""

    def __init__(self, base: ImageReader | None) -> None:
        self._base = base
        self._size = 0 if base is None else base.size
        self._data: list[Extent] = [] if base is None else [e for e in base.extents() if e.data]
        self._next = 0  # reads come in order: the first data extent that may still matter

    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes of ``[offset, offset + length)``; None if they are all zeroes."""
        end = offset + length
        data = self._data
        while self._next < len(data) and data[self._next].end <= offset:
            self._next += 1
        if self._base is None or self._next == len(data) or data[self._next].start >= end:
            return None
        inside = min(length, self._size - offset)  # a base smaller than the copy: zeroes past it
        return self._base.read(offset, inside) + bytes(length - inside)


def _write_differences(
    writer: ImageWriter, offset: int, data: memoryview | None, old: bytes | None
) -> None:
    """Write the clusters of ``data`` (None: zeroes) at ``offset`` that differ from ``old``
    (what the target reads there; None: zeroes), runs of adjacent ones in one request."""
    if data is None and old is None:
        return
    end = offset + (len(data) if data is not None else len(old or b""))
    run_start, run_zero = -1, False

    def flush_run(upto: int) -> None:
        if run_start < 0:
            return
        if run_zero:
            writer.write_zeroes(run_start, upto - run_start)
        else:
            assert data is not None
            writer.write(run_start, data[run_start - offset : upto - offset])

    a = offset
    while a < end:
        b = min(end, (a // CLUSTER + 1) * CLUSTER)
        zeroes = _ZEROES[: b - a]
        # One copy of the cluster: comparing a memoryview itself is ten times slower.
        new = zeroes if data is None else data[a - offset : b - offset].tobytes()
        was = zeroes if old is None else old[a - offset : b - offset]
        if new == was:
            flush_run(a)
            run_start = -1
        else:
            zero = new == zeroes
            if run_start >= 0 and zero != run_zero:
                flush_run(a)
                run_start = -1
            if run_start < 0:
                run_start, run_zero = a, zero
        a = b
    flush_run(end)


def _written(writer: ImageWriter) -> int:
    """Bytes the writer's server sent to the storage so far (``write_bytes`` of
    ``/proc/<pid>/io``); on a file system the kernel does not count so (tmpfs), the bytes it
    passed to write calls (``wchar``: its NBD replies included, 16 bytes a request)."""
    counters = writer.io_counters()
    return counters.get("write_bytes") or counters.get("wchar", 0)
