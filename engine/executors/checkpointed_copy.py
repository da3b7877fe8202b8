"""A copy that records where its data is durable as it goes, and resumes from there.

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
beyond, which is the same bytes, written again.

:func:`run_copy` is this copy as a stage runs it (``copy`` and ``diff`` in stages.py): it
takes over the file of the attempt that recorded the stage's last checkpoint, if that file is
still there and no other process holds it (QEMU's image lock: a fenced host's writer still
running), and records each checkpoint under the stage's claim.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``; the
standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.aggregates.operations import Checkpoint
from engine.errors import QemuError, VolumeFileNotFound
from engine.executors.stage_run import StageRun, Volume
from engine.formats.qemu.digests import (
    HASH_BYTES,
    ChunkHasher,
    DigestCancelled,
    VolumeDigest,
    chunk_size_for,
    digest_image,
)
from engine.formats.qemu.image_io import Extent, ImageReader, ImageWriter, open_reader, open_writer

logger = logging.getLogger("engine.executors")
# How QEMU says that another process holds an image's lock.
_LOCKED = re.compile(r'Failed to get (shared )?"[^"]+" lock')

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

    digest: VolumeDigest
    written: int


def run_copy(
    run: StageRun,
    volume: Volume,
    temp: str,
    source: Volume,
    base: Volume | None,
    new_file: Callable[[str, int], None],
    last: Checkpoint | None,
    mid_point: str,
) -> VolumeDigest:
    """Copy ``source`` into ``temp`` (made by ``new_file(temp, size)``, or taken over from
    the attempt that recorded ``last``), durably, recording checkpoints; the digest of what
    was copied."""

    def stop() -> None:
        if run.cancel is not None and run.cancel.is_set():
            raise run.cancelled("this host cancelled it")

    def checkpoint(reached: Reached) -> None:
        if run.checkpoint is not None:
            run.checkpoint(
                offset=reached.offset,
                percent=reached.percent,
                chunks=reached.chunks,
                written=reached.written,
            )
        elif run.progress is not None:  # a stage run without a claim (tests, tools)
            run.progress(reached.percent)

    for read in (source, base):
        if read is not None and not os.path.exists(read.path):
            raise VolumeFileNotFound(path=read.path)
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(open_reader(source.path, source.fmt))
        under = None if base is None else stack.enter_context(open_reader(base.path, base.fmt))
        writer, start, chunks = _target(run, volume, temp, reader.size, new_file, last)
        stack.enter_context(writer)
        copied = copy_image(
            reader,
            writer,
            base=under,
            start=start,
            done_chunks=chunks,
            checkpoint=checkpoint,
            stop=stop,
            first_write=lambda: run.crashpoints(mid_point),
            rate=run.qemu.copy_rate,
        )
    return copied.digest


def digest_of(run: StageRun, volume: Volume, last: Checkpoint | None) -> VolumeDigest:
    """The digest of ``volume``, published by an earlier attempt: its last checkpoint's, if it
    recorded every chunk; else read from the volume."""
    size = run.qemu.info(volume.path, fmt=volume.fmt)["virtual-size"]
    chunk = chunk_size_for(size)
    if (
        last is not None
        and last.offset == size
        and len(last.chunks) == -(-size // chunk) * HASH_BYTES
    ):
        return VolumeDigest(size, chunk, last.chunks)
    try:
        return digest_image(volume.path, volume.fmt, cancel=run.cancel)
    except DigestCancelled as e:
        raise run.cancelled("this host cancelled it") from e


def _target(
    run: StageRun,
    volume: Volume,
    temp: str,
    size: int,
    new_file: Callable[[str, int], None],
    last: Checkpoint | None,
) -> tuple[ImageWriter, int, bytes]:
    """The writer of ``temp``, and the offset and hashes the copy starts from: the file of
    the attempt that recorded ``last``, renamed to ``temp``, where it can be taken over; else
    a new file, from the start."""
    if last is not None:
        resumed = _take_over(run, volume, temp, size, last)
        if resumed is not None:
            return resumed, last.offset, last.chunks
    new_file(temp, size)
    return open_writer(temp, volume.fmt), 0, b""


def _take_over(
    run: StageRun, volume: Volume, temp: str, size: int, last: Checkpoint
) -> ImageWriter | None:
    chunk = chunk_size_for(size)
    if (
        last.offset % chunk
        or last.offset > size
        or len(last.chunks) != last.offset // chunk * HASH_BYTES
    ):
        return None  # a checkpoint of another copy (the source was resized?): from the start
    old = run.storage.temp_path(
        volume.volume_id, volume.fmt, f"{run.op_id}-{run.index}-e{last.epoch}"
    )
    if not any(f.path == old for f in run.storage.temporaries_of(volume.volume_id)):
        return None
    run.storage.check_own_file(old)
    try:
        if volume.fmt == "qcow2":
            # A writer killed past its last flush may have allocated clusters it never
            # recorded: leaked, harmless, but space. Freed before the file is taken over.
            run.qemu.check(old, fmt=volume.fmt, repair_leaks=True)
        writer = open_writer(old, volume.fmt)  # takes the image's lock: no one else writes it
    except (QemuError, OSError) as e:
        # Held by another process (a fenced host's writer, still running: QEMU's lock, which
        # qemu-nbd may report by dropping the connection), or not an image QEMU can open
        # any more: either way, not a file to resume in.
        held = isinstance(e, QemuError) and _LOCKED.search(e.stderr) is not None
        logger.info(
            "stage %d of operation %s on image %s starts its copy again: the file %s of the "
            "attempt it would resume %s",
            run.index + 1, run.op_id, run.image_id, old,
            "is held by another process (a fenced host's?)" if held else f"cannot be opened: {e}",
            extra={"image": str(run.image_id), "operation": run.op_id, "stage": run.index + 1},
        )  # fmt: skip
        run.storage.remove(old)  # its writer goes on into a file nobody will publish
        return None
    try:
        if writer.size != size:
            raise ValueError(f"{old} is {writer.size} bytes, the copy {size}")
        run.storage.retag(old, temp)
    except (ValueError, VolumeFileNotFound):
        writer.close()
        run.storage.remove(old)
        return None
    except BaseException:
        writer.close()
        raise
    logger.info(
        "stage %d of operation %s on image %s resumes its copy at byte %d of %d, in the file "
        "of the attempt at epoch %d",
        run.index + 1, run.op_id, run.image_id, last.offset, size, last.epoch,
        extra={"image": str(run.image_id), "operation": run.op_id, "stage": run.index + 1},
    )  # fmt: skip
    return writer


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
) -> Copied:
    """Copy ``reader``'s guest-visible bytes from ``start`` into ``writer``'s image, which
    reads as zeroes there (a new file) or as ``base`` reads (an overlay of ``base``), or as
    the source where an earlier attempt of this copy wrote. ``start`` is a checkpoint's
    offset and ``done_chunks`` the hashes recorded up to it. ``stop`` raises to end the copy
    (asked before each block); ``first_write`` is called once, before anything is written;
    ``rate``: bytes of data read a second at most (0: no limit)."""
    size = reader.size
    if writer.size != size:
        raise ValueError(f"sizes differ: source {size}, target {writer.size}")
    chunk = chunk_size_for(size)
    if start % chunk or not 0 <= start <= size or len(done_chunks) != start // chunk * HASH_BYTES:
        raise ValueError(f"{start} is not a checkpoint of a copy of {size} bytes")
    hasher = ChunkHasher(size, chunk, start)
    chunks = bytearray(done_chunks)  # every chunk's hash so far
    told = 0  # of which the checkpoints recorded so many bytes (none yet, for this attempt)
    under = _Under(base)

    def reach() -> None:
        nonlocal told
        writer.flush()  # durable before the log says so
        chunks.extend(hasher.take())
        percent = hasher.done * 100 // size if size else 100
        checkpoint(Reached(hasher.done, percent, bytes(chunks[told:]), _written(writer)))
        told = len(chunks)

    started = False
    pace = _Pace(rate, stop)
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
            data = None if isinstance(piece, int) else bytes(piece[done : done + n])
            _write_differences(writer, at, data, under.read(at, n))
            if data is None:
                hasher.zeroes(n)
            else:
                hasher.update(data)
                pace.passed(n)  # written, not yet checkpointed: where a kill costs the most
            done += n
            if hasher.done % chunk == 0 or hasher.done == size:
                reach()
    if hasher.done != size:
        raise ValueError(f"the source's extents end at {hasher.done}, not at {size}")
    if not started:
        reach()  # nothing was left to copy: the last checkpoint still says so
    return Copied(VolumeDigest(size, chunk, bytes(chunks)), _written(writer))


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
    writer: ImageWriter, offset: int, data: bytes | None, old: bytes | None
) -> None:
    """Write the clusters of ``data`` (None: zeroes) at ``offset`` that differ from ``old``
    (what the target reads there; None: zeroes), runs of adjacent ones in one request."""
    if data == old:
        return  # both None, or a block the same as the base's
    end = offset + len(data if data is not None else old or b"")
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
        new = _ZEROES[: b - a] if data is None else data[a - offset : b - offset]
        was = _ZEROES[: b - a] if old is None else old[a - offset : b - offset]
        if new == was:
            flush_run(a)
            run_start = -1
        else:
            zero = data is None or new == _ZEROES[: b - a]
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
