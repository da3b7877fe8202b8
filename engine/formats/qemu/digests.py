"""Digests of immutable volumes: the sha256 of each chunk of the guest-visible bytes.

A digest is taken over what a guest reads (the volume through its backing chain), not over the
file: a snapshot copied to another repository as one flat raw file and the same snapshot kept as
a thin qcow2 overlay there read the same, and must have the same digest. Chunked rather than one
hash so that a deep check can say *where* the data rotted (the chunk's byte range), an overlay's
digest can take its backing's hashes for the chunks it does not allocate, and a copy's
checkpoints can carry the hashes of the chunks done so far (docs/adr/0031).

Each chunk's hash is exactly ``sha256`` of those bytes: an auditor can check one with
``qemu-img convert -O raw`` and ``dd | sha256sum``, no Strata needed. The chunk size depends only
on the virtual size (a power of two, at least 1 MiB, at most 256 chunks), so equal content has
equal digests in every repository.

Imports: its own package; the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.formats.qemu.image_io import Extent, ImageReader, open_reader

MIN_CHUNK = 1 << 20
MAX_CHUNKS = 256
HASH_BYTES = 32
_ZEROES = bytes(1 << 20)

Progress = Callable[[float], None]


class DigestCancelled(Exception):
    """The caller's cancel event was set while a digest was being read."""


def chunk_size_for(size: int) -> int:
    chunk = MIN_CHUNK
    while chunk * MAX_CHUNKS < size:
        chunk *= 2
    return chunk


@dataclass(frozen=True, slots=True)
class VolumeDigest:
    size: int
    chunk_size: int
    chunks: bytes  # HASH_BYTES per chunk, in order

    def __post_init__(self) -> None:
        expected = -(-self.size // self.chunk_size) if self.size else 0
        if len(self.chunks) != expected * HASH_BYTES:
            raise ValueError(
                f"a digest of {self.size} bytes in chunks of {self.chunk_size} has "
                f"{expected} hashes, not {len(self.chunks) / HASH_BYTES:g}"
            )

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> VolumeDigest | None:
        """The digest a log record holds (``VolumeDigested``'s fields), or None if there is
        none or it is not one this Strata can read: then the volume is read without it."""
        if record is None:
            return None
        try:
            return cls(record["size"], record["chunk_size"], bytes(record["chunks"]))
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def count(self) -> int:
        return len(self.chunks) // HASH_BYTES

    def chunk(self, i: int) -> bytes:
        return self.chunks[i * HASH_BYTES : (i + 1) * HASH_BYTES]

    def range_of(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    @property
    def digest(self) -> str:
        """One hex string for the whole volume (what repositories compare)."""
        head = f"strata-digest-1 {self.size} {self.chunk_size}\n".encode()
        return hashlib.sha256(head + self.chunks).hexdigest()

    def chunks_over(self, extents: Iterable[Extent]) -> set[int]:
        """The chunks that the given extents touch."""
        touched: set[int] = set()
        for e in extents:
            if e.length:
                touched.update(
                    range(e.start // self.chunk_size, (e.end - 1) // self.chunk_size + 1)
                )
        return touched


@functools.lru_cache(maxsize=64)
def zero_chunk_hash(length: int) -> bytes:
    h = hashlib.sha256()
    for _ in range(length // len(_ZEROES)):
        h.update(_ZEROES)
    h.update(_ZEROES[: length % len(_ZEROES)])
    return h.digest()


class ChunkHasher:
    """Hashes guest bytes fed in order from ``start`` (a chunk boundary), chunk by chunk."""

    def __init__(self, size: int, chunk_size: int, start: int = 0) -> None:
        if start % chunk_size or not 0 <= start <= size:
            raise ValueError(f"a hasher starts at a chunk boundary, not at {start}")
        self.size = size
        self.chunk_size = chunk_size
        self.done = start
        self._hash = hashlib.sha256()
        self._fed = 0  # bytes of the current chunk fed so far
        self._new = bytearray()

    def _room(self) -> int:
        end = min(self.size, (self.done // self.chunk_size + 1) * self.chunk_size)
        return end - self.done

    def _end_chunk(self) -> None:
        self._new += self._hash.digest()
        self._hash = hashlib.sha256()
        self._fed = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            room = self._room()
            if room <= 0:
                raise ValueError("fed past the end of the volume")
            part = view[:room]
            self._hash.update(part)
            self.done += len(part)
            self._fed += len(part)
            view = view[len(part) :]
            if len(part) == room:
                self._end_chunk()

    def zeroes(self, n: int) -> None:
        while n > 0:
            room = self._room()
            if room <= 0:
                raise ValueError("fed past the end of the volume")
            if self._fed == 0 and n >= room:  # a whole chunk of zeroes: its hash is known
                self._new += zero_chunk_hash(room)
                self.done += room
                n -= room
                continue
            part = min(n, room, len(_ZEROES))
            self.update(_ZEROES[:part])
            n -= part

    def take(self) -> bytes:
        """The hashes of the chunks completed since the last call."""
        new, self._new = bytes(self._new), bytearray()
        return new


def digest_image(
    path: str,
    fmt: str,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    reuse: VolumeDigest | None = None,
    force_share: bool = False,
) -> VolumeDigest:
    """The digest of the image at ``path`` read through its chain. With ``reuse`` (the digest of
    the volume's backing, of the same size), only the chunks the volume itself allocates are
    read; the others are its backing's. ``force_share``: read without QEMU's image lock
    (:func:`~engine.formats.qemu.image_io.open_reader`)."""
    with open_reader(path, fmt, force_share=force_share) as reader:
        size = reader.size
        chunk = chunk_size_for(size)
        empty = VolumeDigest(size, chunk, bytes(HASH_BYTES * (-(-size // chunk))))
        todo = _chunks_to_read(reader.extents(), empty, reuse)
        hashes = _read_chunks(reader, empty, todo, progress, cancel)
    out = bytearray(empty.chunks)
    for i in range(empty.count):
        h = hashes.get(i) if i in todo else reuse.chunk(i) if reuse is not None else None
        assert h is not None
        out[i * HASH_BYTES : (i + 1) * HASH_BYTES] = h
    return VolumeDigest(size, chunk, bytes(out))


def verify_image(
    path: str,
    fmt: str,
    expected: VolumeDigest,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    backing: VolumeDigest | None = None,
) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` of the chunks whose content is not what ``expected``
    says, adjacent ones joined. With ``backing`` (the recorded digest of the volume's backing,
    verified on its own), only the chunks the volume itself allocates are read; for the others
    the two records must agree."""
    with open_reader(path, fmt) as reader:
        if reader.size != expected.size:
            return [(0, max(reader.size, expected.size))]
        chunk = chunk_size_for(reader.size)
        if chunk != expected.chunk_size:
            return [(0, expected.size)]
        todo = _chunks_to_read(reader.extents(), expected, backing)
        hashes = _read_chunks(reader, expected, todo, progress, cancel)
    bad = []
    for i in range(expected.count):
        got = hashes[i] if i in todo else backing.chunk(i) if backing is not None else None
        if got != expected.chunk(i):
            bad.append(expected.range_of(i))
    return _joined(bad)


def _chunks_to_read(
    extents: list[Extent], shape: VolumeDigest, reuse: VolumeDigest | None
) -> Collection[int]:
    if reuse is None or (reuse.size, reuse.chunk_size) != (shape.size, shape.chunk_size):
        return range(shape.count)
    return shape.chunks_over(e for e in extents if e.depth == 0 and e.present)


def _read_chunks(
    reader: ImageReader,
    shape: VolumeDigest,
    todo: Collection[int],
    progress: Progress | None,
    cancel: threading.Event | None,
) -> dict[int, bytes]:
    """Hash each chunk of ``todo``, reading runs of consecutive chunks in one pass."""
    hashes: dict[int, bytes] = {}
    total = sum(shape.range_of(i)[1] - shape.range_of(i)[0] for i in todo) or 1
    seen = 0
    for first, last in _runs(sorted(todo)):
        start, end = shape.range_of(first)[0], shape.range_of(last)[1]
        hasher = ChunkHasher(shape.size, shape.chunk_size, start)
        for off, piece in reader.blocks(start, end):
            if cancel is not None and cancel.is_set():
                raise DigestCancelled(f"cancelled at byte {off} of {reader.path}")
            if isinstance(piece, int):
                hasher.zeroes(piece)
                seen += piece
            else:
                hasher.update(piece)
                seen += len(piece)
            if progress is not None:
                progress(100.0 * seen / total)
        got = hasher.take()
        for k, i in enumerate(range(first, last + 1)):
            hashes[i] = got[k * HASH_BYTES : (k + 1) * HASH_BYTES]
    return hashes


def _runs(indexes: list[int]) -> Iterable[tuple[int, int]]:
    run: list[int] = []
    for i in indexes:
        if run and i != run[-1] + 1:
            yield run[0], run[-1]
            run = []
        run.append(i)
    if run:
        yield run[0], run[-1]


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
