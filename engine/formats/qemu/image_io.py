"""Reading an image's guest-visible bytes, and writing an image's, for work that must see the
data pass: a copy that checkpoints as it goes, a digest, a deep check.

``open_reader`` reads what a guest would read from the volume, through its backing chain: a
standalone raw volume is its own file, read directly (nothing is faster); anything else is read
from a private read-only ``qemu-nbd`` (engine/formats/qemu/nbd.py). ``extents`` says which
ranges hold data and which read as zeroes, and at which depth of the chain each is allocated, so
callers read only data, and an overlay's own clusters apart from its backing's.

``open_writer`` writes an existing image through a private ``qemu-nbd`` that bypasses the page
cache (docs/adr/0006) where the file system allows it; ``flush`` makes everything written so far
durable, qcow2 tables included. QEMU's image lock is taken by that server, so two writers of one
file (a fenced host and the one that took its work over) never write it at once: the second one
fails with QEMU's "Failed to get "write" lock", which callers wait on (engine/executors/stages.py).

Imports: its own package; the standard library.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from engine.formats.qemu.direct_io import accepts_direct_io
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.nbd import MAX_REQUEST, NbdClient, NbdServer

BLOCK = 4 << 20  # bytes per request: large enough for the disk, small enough to pipeline
_PREFETCH = 4  # blocks read ahead of the caller


@dataclass(frozen=True, slots=True)
class Extent:
    """A range of the guest-visible image. ``data``: may hold non-zero bytes (False: reads as
    zeroes). ``depth``: where in the chain it is allocated (0: the top volume itself; the chain's
    length: nowhere). ``present``: allocated somewhere in the chain (zero clusters included)."""

    start: int
    length: int
    data: bool
    depth: int
    present: bool = True

    @property
    def end(self) -> int:
        return self.start + self.length


def image_map(path: str, fmt: str) -> list[Extent]:
    """The adapter's ``qemu-img map`` of the image and its chain, as extents."""
    return [
        Extent(
            start=e["start"],
            length=e["length"],
            data=bool(e["data"]) and not e.get("zero", False),
            depth=e["depth"],
            present=bool(e.get("present", e["data"] or e.get("zero", False))),
        )
        for e in QemuImg().map(path, fmt=fmt)
    ]


class ImageReader:
    """The guest-visible bytes of one image (a context manager)."""

    def __init__(self, path: str, fmt: str, *, force_share: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self._extents: list[Extent] | None = None
        self._fd: int | None = None
        self._server: NbdServer | None = None
        self._client: NbdClient | None = None
        if fmt == "raw":
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.fstat(self._fd).st_size
        else:
            self._server = NbdServer(path, fmt, readonly=True, force_share=force_share)
            self._client = self._server.connect()
            self.size = self._client.size

    def extents(self) -> list[Extent]:
        if self._extents is None:
            self._extents = image_map(self.path, self.fmt)
        return self._extents

    def read_into(self, offset: int, buf: memoryview) -> None:
        if self._client is not None:
            self._client.read_into(offset, buf)
            return
        assert self._fd is not None
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [buf[got:]], offset + got)
            if n == 0:  # past the end of a raw file: zeroes, as a guest reads them
                buf[got:] = bytes(len(buf) - got)
                return
            got += n

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def blocks(
        self, start: int, end: int, *, block: int = BLOCK
    ) -> Iterator[tuple[int, memoryview | int]]:
        """``(offset, data)`` for the data of ``[start, end)`` in order, and ``(offset, n)`` for
        each run of ``n`` bytes that reads as zeroes, read ahead in a second thread so that the
        caller's hashing or writing overlaps the reading. Each block's memory is the caller's
        only until it asks for the next one."""
        pieces: list[tuple[int, int, bool]] = []
        for e in self.extents():
            a, b = max(e.start, start), min(e.end, end)
            if a >= b:
                continue
            if not e.data:
                pieces.append((a, b - a, False))
                continue
            for off in range(a, b, block):
                pieces.append((off, min(block, b - off), True))
        yield from _prefetched(self, pieces, block)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _prefetched(
    reader: ImageReader, pieces: list[tuple[int, int, bool]], block: int
) -> Iterator[tuple[int, memoryview | int]]:
    """Read the data pieces in a thread, ``_PREFETCH`` buffers ahead of the consumer."""
    if not pieces:
        return
    free: queue.Queue[bytearray] = queue.Queue()
    # No larger and no more buffers than the data needs: a small volume's digest (a snapshot
    # of a test's disk) would otherwise spend most of its time zeroing 20 MiB it never reads.
    sizes = [n for _, n, data in pieces if data]
    for _ in range(min(_PREFETCH + 1, len(sizes))):
        free.put(bytearray(min(block, MAX_REQUEST, max(sizes))))
    ready: queue.Queue[tuple[int, int, bytearray | None] | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            for off, n, data in pieces:
                if stop.is_set():
                    return
                if not data:
                    ready.put((off, n, None))
                    continue
                buf = free.get()
                if stop.is_set():
                    return
                reader.read_into(off, memoryview(buf)[:n])
                ready.put((off, n, buf))
            ready.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            ready.put(e)

    thread = threading.Thread(target=work, name="strata-read-ahead", daemon=True)
    thread.start()
    held: bytearray | None = None
    try:
        while True:
            item = ready.get()
            if held is not None:
                free.put(held)
                held = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            off, n, buf = item
            if buf is None:
                yield off, n
            else:
                held = buf
                yield off, memoryview(buf)[:n]
    finally:
        stop.set()
        free.put(bytearray(0))  # wake a reader thread waiting for a buffer
        thread.join()


class ImageWriter:
    """Writes into an existing image through a private ``qemu-nbd`` (a context manager)."""

    def __init__(self, path: str, fmt: str, *, force_share: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        direct = accepts_direct_io(path, create=False)
        self._server = NbdServer(path, fmt, readonly=False, direct=direct)
        try:
            self._client = self._server.connect()
        except BaseException:
            self._server.close()
            raise
        self.size = self._client.size
        self._counters: dict[str, int] = {}

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self._client.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._client.write_zeroes(offset, length)

    def flush(self) -> None:
        self._client.flush()

    def io_counters(self) -> dict[str, int]:
        """The kernel's I/O accounting of the writing server: ``wchar`` (bytes passed to its
        write calls) and ``write_bytes`` (bytes sent to the storage); the last values seen
        once it is closed."""
        now = self._server.io_counters()
        if now:
            self._counters = now
        return dict(self._counters)

    def close(self) -> None:
        self.io_counters()
        self._client.close()
        self._server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_reader(path: str, fmt: str, *, force_share: bool = False) -> ImageReader:
    """``force_share``: take no image lock (a raw file is read without one anyway), for a
    volume nobody may write; a reader that must not run beside a writer takes QEMU's lock."""
    return ImageReader(path, fmt, force_share=force_share)


def open_writer(path: str, fmt: str) -> ImageWriter:
    return ImageWriter(path, fmt)
