"""A checkpointed copy as a stage runs it: resumed in the file of the attempt that recorded
the stage's last checkpoint, its checkpoints recorded under the stage's claim
(docs/adr/0032-resumable-copies.md).

The file is taken over only if it is still there and this attempt can open it: a writer on it
takes QEMU's image lock first (a fenced host's writer still running holds it: the copy then
starts again in a new file), then the file is renamed to this attempt's name through the
repository driver. A qcow2 file first gets its leaked clusters freed: a writer killed past its
last flush may have allocated clusters it never recorded.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``; the
standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from engine.aggregates.operations import Checkpoint
from engine.errors import QemuError, VolumeFileNotFound
from engine.executors.checkpointed_copy import Reached, copy_image
from engine.executors.stage_run import StageRun, Volume
from engine.formats.qemu.digests import (
    HASH_BYTES,
    DigestCancelled,
    VolumeDigest,
    chunk_size_for,
    digest_image,
)
from engine.formats.qemu.image_io import ImageWriter, open_reader, open_writer

logger = logging.getLogger("engine.executors")


def run_copy(
    run: StageRun,
    volume: Volume,
    temp: str,
    source: Volume,
    base: Volume | None,
    new_file: Callable[[str, int], None],
    last: Checkpoint | None,
    mid_point: str,
    digest: bool = True,
) -> VolumeDigest | None:
    """Copy ``source`` into ``temp`` (made by ``new_file(temp, size)``, or taken over from
    the attempt that recorded ``last``), durably, recording checkpoints; the digest of what
    was copied (None without ``digest``, or when the attempt resumed from kept no hashes)."""

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
            digest=digest,
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
        # Every chunk's hash up to the offset, or none (a copy that records no digest).
        or len(last.chunks) not in (0, last.offset // chunk * HASH_BYTES)
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
        held = isinstance(e, QemuError) and e.locked
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
