"""Copies through the engine against ``qemu-img convert`` of the same image, in the same run.

    python bench/image_copy.py [--dir DIR] [--data-mib N]

Prints ``name: value`` lines:

* ``copy_ratio_vs_qemu_img``: ``copy_image`` to another repository, from the call until the copy
  is optimized, for a 2 GiB disk holding 1 GiB of data, over ``qemu-img convert`` of the same
  source volume to the same format on the same filesystem (target <= 1.1);
* ``sparse_copy_ratio_vs_qemu_img`` and ``sparse_copy_seconds``: the same for a 100 GiB disk
  holding 10 MiB (target <= 1.1 and under 1 s);
* ``incremental_bytes_ratio``: bytes the incremental copy allocates over the bytes that changed
  since the base copy (target <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from _about import interpreter

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg, allocated_bytes

MiB, GiB = 2**20, 2**30


def timed_copy(se: StorageEngine, image: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    copy = se.copy_image("r2", image)
    status = se.wait_for_image("r2", copy, timeout=600)
    elapsed = time.perf_counter() - t0
    if status.status != "optimized":
        raise RuntimeError(f"copy ended {status}")
    return elapsed, copy


def timed_convert(qemu: QemuImg, src: str, fmt: str, dst: str, *, durable: bool = False) -> float:
    dst = f"{dst}-{time.monotonic_ns()}"
    """``qemu-img convert``; with ``durable``, also the fsync the engine must do before it may
    record the copy as done (plain convert leaves the data in the page cache)."""
    t0 = time.perf_counter()
    qemu.convert(src, dst, src_fmt=fmt, dst_fmt=fmt)
    if durable:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    # Not deleted here: freeing a just-written GiB slows whatever the filesystem does next,
    # which would be the next measurement. The work directory goes at the end.
    return time.perf_counter() - t0


def compare(
    se: StorageEngine,
    qemu: QemuImg,
    image: str,
    path: str,
    fmt: str,
    scratch: str,
    rounds: int,
    label: str,
) -> tuple[float, float, str]:
    """Median of ``rounds`` alternating runs of each side, the page cache flushed before each
    (a source written moments ago is still being written back, which slows whoever goes first).
    """
    ours: list[float] = []
    theirs: list[float] = []
    durable: list[float] = []
    copies: list[str] = []

    def copy_once() -> None:
        elapsed, copy = timed_copy(se, image)
        ours.append(elapsed)
        copies.append(copy)

    sides = [
        lambda: theirs.append(timed_convert(qemu, path, fmt, scratch)),
        lambda: durable.append(timed_convert(qemu, path, fmt, scratch, durable=True)),
        copy_once,
    ]
    os.sync()
    timed_convert(qemu, path, fmt, scratch)  # warm-up, not counted: the first run pays extra
    for round_ in range(rounds):
        for i in range(len(sides)):  # rotate, so that no side always runs first
            os.sync()
            sides[(round_ + i) % len(sides)]()
    print(f"{label}durable_convert_seconds: {statistics.median(durable):.3f}")
    return statistics.median(ours), statistics.median(theirs), copies[0]


def disk_with_data(se: StorageEngine, qemu: QemuImg, size: int, data: int) -> tuple[str, str, str]:
    disk = se.create_virtual_disk("r1", size)
    se.wait_for_image("r1", disk, timeout=60)
    prepared = se.prepare_image("r1", disk)
    chunk = min(data, 256 * MiB)
    for offset in range(0, data, chunk):  # spread over the disk, like a used filesystem
        qemu.write_pattern(prepared.path, prepared.format, offset * 2, chunk, 0x5C)
    se.teardown_image("r1", disk)
    return disk, prepared.path, prepared.format


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="strata-bench-copy-", dir=args.dir)
    qemu = QemuImg()
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    try:
        repos = [os.path.join(work, n) for n in ("repo1", "repo2")]
        with StorageEngine(
            "bench", state_dir=os.path.join(work, "state"), poll_interval=0.05
        ) as se:
            for name, path in zip(("r1", "r2"), repos, strict=True):
                os.mkdir(path)
                se.create_storage_repository("localfs-1.0", {"path": path})
                se.connect_storage_repository(name, "localfs-1.0", {"path": path})
            scratch = os.path.join(repos[1], "scratch-convert")

            disk, path, fmt = disk_with_data(se, qemu, 2 * GiB, args.data_mib * MiB)
            ours, baseline, _ = compare(se, qemu, disk, path, fmt, scratch, args.rounds, "")
            print(f"copy_seconds: {ours:.3f}")
            print(f"qemu_img_convert_seconds: {baseline:.3f}")
            print(f"copy_ratio_vs_qemu_img: {ours / baseline:.2f}")

            sparse, path, fmt = disk_with_data(se, qemu, 100 * GiB, 10 * MiB)
            ours, baseline, copy1 = compare(
                se, qemu, sparse, path, fmt, scratch, args.rounds, "sparse_"
            )
            print(f"sparse_copy_seconds: {ours:.3f}")
            print(f"sparse_qemu_img_convert_seconds: {baseline:.3f}")
            print(f"sparse_copy_ratio_vs_qemu_img: {ours / baseline:.2f}")

            changed = 16 * MiB
            prepared = se.prepare_image("r1", sparse)
            qemu.write_pattern(prepared.path, prepared.format, 40 * GiB, changed, 0x77)
            se.teardown_image("r1", sparse)
            copy2 = se.copy_image("r2", sparse, base_image_id=copy1)
            se.wait_for_image("r2", copy2, timeout=600)
            diff = se.prepare_image("r2", copy2)
            se.teardown_image("r2", copy2)
            allocated = allocated_bytes(diff.path)
            print(f"incremental_changed_bytes: {changed}")
            print(f"incremental_allocated_bytes: {allocated}")
            print(f"incremental_bytes_ratio: {allocated / changed:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
