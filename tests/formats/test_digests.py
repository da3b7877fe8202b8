"""Digests of guest-visible data (docs/adr/0031), against real images made with qemu-img and
qemu-io, and against hashlib over the bytes ``qemu-img convert -O raw`` gives: the definition an
auditor checks with no Strata at hand."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from engine.formats.qemu.digests import (
    HASH_BYTES,
    ChunkHasher,
    DigestCancelled,
    VolumeDigest,
    chunk_size_for,
    digest_image,
    verify_image,
    zero_chunk_hash,
)

MiB = 1 << 20


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def write(path: Path, fmt: str, *writes: tuple[int, int, int]) -> None:
    run("qemu-io", "-f", fmt, *(a for p, o, n in writes for a in ("-c", f"write -P {p} {o} {n}")),
        str(path))  # fmt: skip


def by_hashlib(path: Path, fmt: str, tmp: Path) -> VolumeDigest:
    flat = tmp / f"flat-{path.name}.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(flat))
    data = flat.read_bytes()
    chunk = chunk_size_for(len(data))
    hashes = b"".join(
        hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)
    )
    return VolumeDigest(len(data), chunk, hashes)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """A raw base with data at chunk edges and a hole, and a qcow2 overlay over it."""
    base = tmp_path / "base.raw"
    run("qemu-img", "create", "-f", "raw", str(base), "5M")
    write(base, "raw", (0x11, MiB - 4096, 8192), (0x22, 3 * MiB, 65536))
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    write(top, "qcow2", (0x33, 3 * MiB + 4096, 4096), (0, 4 * MiB, 65536))
    return base, top


def test_chunk_size_is_a_power_of_two_of_at_least_a_mebibyte_and_at_most_256_chunks() -> None:
    assert chunk_size_for(0) == MiB
    assert chunk_size_for(256 * MiB) == MiB
    assert chunk_size_for(256 * MiB + 1) == 2 * MiB
    assert chunk_size_for(4 << 30) == 16 * MiB
    for size in (1, 10**9, 3 << 40):
        chunk = chunk_size_for(size)
        assert chunk & (chunk - 1) == 0 and -(-size // chunk) <= 256


def test_each_chunk_is_the_sha256_of_its_guest_bytes(
    chain: tuple[Path, Path], tmp_path: Path
) -> None:
    base, top = chain
    for path, fmt in ((base, "raw"), (top, "qcow2")):
        assert digest_image(str(path), fmt) == by_hashlib(path, fmt, tmp_path)


def test_a_flat_copy_and_an_overlay_of_the_same_content_have_the_same_digest(
    chain: tuple[Path, Path], tmp_path: Path
) -> None:
    _, top = chain
    flat = tmp_path / "flat.qcow2"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(top), str(flat))
    assert digest_image(str(flat), "qcow2").digest == digest_image(str(top), "qcow2").digest


def test_an_overlay_reuses_its_backings_hashes_for_the_chunks_it_does_not_allocate(
    chain: tuple[Path, Path], tmp_path: Path
) -> None:
    base, top = chain
    seen: list[float] = []
    whole = digest_image(str(top), "qcow2")
    reused = digest_image(
        str(top), "qcow2", reuse=digest_image(str(base), "raw"), progress=seen.append
    )
    assert reused == whole
    assert seen and seen[-1] == 100.0
    # A wrong backing digest shows in the chunks taken from it, and only there.
    lie = VolumeDigest(whole.size, whole.chunk_size, bytes(whole.count * HASH_BYTES))
    fake = digest_image(str(top), "qcow2", reuse=lie)
    assert [i for i in range(whole.count) if fake.chunk(i) != whole.chunk(i)] == [0, 1, 2]


def test_verify_names_the_chunk_ranges_that_rotted(chain: tuple[Path, Path]) -> None:
    base, top = chain
    expected = digest_image(str(base), "raw")
    expected_top = digest_image(str(top), "qcow2")
    assert verify_image(str(base), "raw", expected) == []
    with open(base, "r+b") as f:  # a flipped byte in the data just past 1 MiB
        f.seek(MiB + 100)
        byte = f.read(1)
        f.seek(MiB + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify_image(str(base), "raw", expected) == [(MiB, 2 * MiB)]
    # The overlay does not cover that byte: read whole, its view shows the rot too. Read with
    # its backing's digest, it reads only its own chunks and takes the others from the
    # backing's record: the rot is then the backing's own verification's to report.
    assert verify_image(str(top), "qcow2", expected_top) == [(MiB, 2 * MiB)]
    assert verify_image(str(top), "qcow2", expected_top, backing=expected) == []


def test_verify_reports_a_size_that_changed(chain: tuple[Path, Path]) -> None:
    base, _ = chain
    expected = digest_image(str(base), "raw")
    run("qemu-img", "resize", "-f", "raw", str(base), "6M")
    assert verify_image(str(base), "raw", expected) == [(0, 6 * MiB)]


def test_the_hasher_takes_bytes_and_zeroes_in_any_pieces_and_can_start_at_a_checkpoint() -> None:
    size, chunk = 5 * MiB + 123, MiB
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    whole = b"".join(hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, size, chunk))
    h = ChunkHasher(size, chunk)
    h.update(data[:1000])
    h.update(data[1000 : 2 * MiB + 7])
    first = h.take()
    assert first == whole[: 2 * HASH_BYTES]
    h.update(data[2 * MiB + 7 :])
    assert first + h.take() == whole and h.done == size
    resumed = ChunkHasher(size, chunk, start=3 * MiB)
    resumed.update(data[3 * MiB :])
    assert resumed.take() == whole[3 * HASH_BYTES :]
    zeros = ChunkHasher(3 * MiB, chunk)
    zeros.update(bytes(10))
    zeros.zeroes(3 * MiB - 10)
    assert zeros.take() == zero_chunk_hash(MiB) * 3
    with pytest.raises(ValueError):
        ChunkHasher(size, chunk, start=100)
    with pytest.raises(ValueError):
        zeros.update(b"x")


def test_a_digest_stops_when_cancelled(chain: tuple[Path, Path]) -> None:
    import threading

    _, top = chain
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DigestCancelled):
        digest_image(str(top), "qcow2", cancel=cancel)


def test_a_digest_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        VolumeDigest(3 * MiB, MiB, bytes(HASH_BYTES))
    d = VolumeDigest(3 * MiB, MiB, bytes(3 * HASH_BYTES))
    assert d.count == 3 and d.range_of(2) == (2 * MiB, 3 * MiB) and len(d.digest) == 64
