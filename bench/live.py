"""Live operations on an attached image, against the offline ``qemu-img`` work they replace and
against a virtual machine's writes without them, in the same run.

    python bench/live.py [--dir DIR] [--size-mib N | --quick] [--rounds N]

The virtual machine is :class:`tests.vm.GuestWriter`: one ``qemu-io`` on the image's NBD export
writing 64 KiB blocks one after another; every write it was told was done is read back at the end.
Chains are made through the facade, offline (create the disk, write, snapshot, write), then
attached. Prints ``name: value`` lines:

* ``median_write_ms``: a writer's median write latency with nothing else going on (and
  ``max_write_ms_without_snapshot``, the longest of those 500 writes, to tell a stall from noise);
  ``live_snapshot_max_write_ms``: the longest latency of a write in flight while a live snapshot
  (``create_snapshot`` on the attached disk, call to completion) runs, the worst of the rounds;
  ``live_snapshot_write_stall_ratio``: the second over the first (target <= 5);
* seconds are medians of ``--rounds`` runs of each side, on a new chain each time;
* ``live_commit_seconds``: active ``block_commit`` of a top volume holding the data into its empty
  base, writer idle, call to completion; ``qemu_img_commit_seconds``: ``qemu-img commit`` of a
  chain made the same way, fsync'd; ``live_commit_ratio_vs_qemu_img_commit`` (target <= 1.3);
* ``live_pull_seconds``: full ``block_pull`` of a chain whose base holds the data;
  ``qemu_img_rebase_seconds``: ``qemu-img rebase -b ''`` of the same, fsync'd;
  ``pull_ratio_vs_qemu_img_rebase`` (target <= 1.3);
* ``guest_write_mib_per_s`` and ``guest_write_mib_per_s_during_commit``: the writer's throughput
  before and during a live active commit of the same disk;
  ``guest_write_throughput_during_commit_ratio``: the second over the first (target >= 0.5).

A figure whose engine call is refused is printed as ``skipped (why)`` and the script
then exits 1. Every storage daemon it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from _about import interpreter

from engine import StorageEngine
from engine.errors import StrataError
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon

# tests/vm.py plays the virtual machine for the tests and for this benchmark alike.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.vm import GuestWriter, Write

KiB, MiB = 2**10, 2**20
REPO = "r1"
FINISHED = ("completed", "failed", "aborted")


class Skipped(Exception):
    """A figure that cannot be measured on this engine (a call it lacks, or refuses)."""


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backing_chain(qemu: QemuImg, top: str) -> list[str]:
    """The volume files under ``top``, base first (from the images' headers, not the engine)."""
    chain = qemu.info(top, chain=True)
    return [image["filename"] for image in reversed(chain)]


def chain_with_data(se: StorageEngine, qemu: QemuImg, size: int, data_in: str) -> tuple[str, str]:
    """A disk of ``size`` bytes, all of them written, snapshotted once (the snapshot removed):
    base <- top, the data in ``data_in`` ("base" or "top"); the other volume empty. Returns the
    disk and its top's path."""
    disk = se.create_virtual_disk(REPO, size)
    se.wait_for_image(REPO, disk, timeout=60)
    if data_in == "base":
        write_all(se, qemu, disk, size, 0x5B)
    # Removed at once: a commit may not write a base that a live snapshot still reads.
    se.remove_image(REPO, se.create_snapshot(REPO, disk))
    se.wait_for_image(REPO, disk, timeout=60)
    top = write_all(se, qemu, disk, size, 0x7C) if data_in == "top" else prepared_path(se, disk)
    os.sync()
    return disk, top


def write_all(se: StorageEngine, qemu: QemuImg, disk: str, size: int, pattern: int) -> str:
    prepared = se.prepare_image(REPO, disk)
    try:
        chunk = min(size, 256 * MiB)
        for offset in range(0, size, chunk):
            qemu.write_pattern(prepared.path, prepared.format, offset, chunk, pattern)
    finally:
        se.teardown_image(REPO, disk)
    return prepared.path


def prepared_path(se: StorageEngine, disk: str) -> str:
    path = se.prepare_image(REPO, disk).path
    se.teardown_image(REPO, disk)
    return path


def wait_for_job(se: StorageEngine, disk: str, timeout: float = 3600) -> None:
    """Until the image's block job is over (its state final, or gone) and its operation done."""
    deadline = time.monotonic() + timeout
    while True:
        job = se.get_block_job(REPO, disk)
        if job is None or job.state in FINISHED:
            break
        if time.monotonic() > deadline:
            raise Skipped(f"block job still {job.state} after {timeout} s")
        time.sleep(0.02)
    se.wait_for_image(REPO, disk, timeout=timeout)
    if job is not None and job.state != "completed":
        raise Skipped(f"block job ended {job.state}: {job.error}")


def mib_per_s(writes: list[Write], start: float, end: float) -> float:
    done = sum(w.length for w in writes if start <= w.acked <= end)
    return done / MiB / (end - start)


# --- the figures ---------------------------------------------------------------------------------
def write_latency(se: StorageEngine, size: int, rounds: int) -> None:
    disk = se.create_virtual_disk(REPO, size)
    se.wait_for_image(REPO, disk, timeout=60)
    uri = se.attach_image(REPO, disk).nbd_uri
    area = min(size, 64 * MiB)
    with GuestWriter(uri, "raw", length=area) as writer:
        writer.wait_for_writes(2 * area // (64 * KiB))  # every block allocated, twice over
        calm = len(writer.writes)
        writer.wait_for_writes(calm + 500)
        quiet = [w.latency for w in writer.writes[calm:]]
        median = statistics.median(quiet)
        print(f"median_write_ms: {median * 1000:.3f}")
        print(f"max_write_ms_without_snapshot: {max(quiet) * 1000:.3f}")
        try:
            worst = 0.0
            for _ in range(rounds):
                begin = len(writer.writes)
                writer.wait_for_writes(begin + 100)
                t0 = time.perf_counter()
                se.create_snapshot(REPO, disk)
                se.wait_for_image(REPO, disk, timeout=120)
                t1 = time.perf_counter()
                writer.wait_for_writes(len(writer.writes) + 100)
                across = [
                    w.latency for w in writer.writes[begin:] if w.sent <= t1 and w.acked >= t0
                ]
                worst = max([worst, *across])
        except StrataError as e:
            raise Skipped(f"create_snapshot on an attached disk: {e}") from e
        finally:
            writer.verify(uri, "raw")
            se.detach_image(REPO, disk)
    print(f"live_snapshot_max_write_ms: {worst * 1000:.3f}")
    print(f"live_snapshot_write_stall_ratio: {worst / median:.2f}")


def alternate(
    rounds: int,
    baseline: Callable[[], float],
    ours: Callable[[], float],
    baseline_name: str,
) -> tuple[float, float]:
    """Medians of ``rounds`` runs of each side, taking turns at going first (the one after
    a run finds the page cache and the disk's writeback as that run left them). The baseline is
    printed first."""
    theirs: list[float] = []
    mine: list[float] = []
    for round_ in range(rounds):
        if round_ % 2:
            mine.append(ours())
        theirs.append(baseline())
        if not round_ % 2:
            mine.append(ours())
    print(f"{baseline_name}: {statistics.median(theirs):.3f}")
    return statistics.median(mine), statistics.median(theirs)


def commit_baseline(se: StorageEngine, qemu: QemuImg, size: int) -> float:
    _, top = chain_with_data(se, qemu, size, "top")
    base = backing_chain(qemu, top)[0]
    t0 = time.perf_counter()
    qemu.commit(top, fmt="qcow2")
    fsync(base)
    return time.perf_counter() - t0


def rebase_baseline(se: StorageEngine, qemu: QemuImg, size: int) -> float:
    _, top = chain_with_data(se, qemu, size, "base")
    t0 = time.perf_counter()
    qemu.rebase(top, None, fmt="qcow2")
    fsync(top)
    return time.perf_counter() - t0


def live_commit(se: StorageEngine, qemu: QemuImg, size: int) -> float:
    disk, _ = chain_with_data(se, qemu, size, "top")
    se.attach_image(REPO, disk)
    try:
        chain = se.get_volume_chain(REPO, disk)
        t0 = time.perf_counter()
        se.block_commit(REPO, disk, chain[-1].volume_id, chain[0].volume_id)
        wait_for_job(se, disk)
        return time.perf_counter() - t0
    finally:
        se.detach_image(REPO, disk)


def live_pull(se: StorageEngine, qemu: QemuImg, size: int) -> float:
    disk, _ = chain_with_data(se, qemu, size, "base")
    se.attach_image(REPO, disk)
    try:
        t0 = time.perf_counter()
        se.block_pull(REPO, disk)
        wait_for_job(se, disk)
        return time.perf_counter() - t0
    finally:
        se.detach_image(REPO, disk)


def throughput_during_commit(
    se: StorageEngine, qemu: QemuImg, size: int, bandwidth: int | None = None
) -> None:
    """One writer on one disk: first alone for a few seconds, then while the disk's top (holding
    ``size`` bytes of data) is committed into its base (at most ``bandwidth`` bytes/s)."""
    disk, _ = chain_with_data(se, qemu, size, "top")
    uri = se.attach_image(REPO, disk).nbd_uri
    try:
        with GuestWriter(uri, "raw", length=min(size, 64 * MiB)) as writer:
            writer.wait_for_writes(100)
            t0 = time.perf_counter()
            time.sleep(5)
            t1 = time.perf_counter()
            alone = mib_per_s(writer.writes, t0, t1)
            print(f"guest_write_mib_per_s: {alone:.1f}")
            chain = se.get_volume_chain(REPO, disk)
            t1 = time.perf_counter()
            se.block_commit(REPO, disk, chain[-1].volume_id, chain[0].volume_id, bandwidth)
            wait_for_job(se, disk)
            t2 = time.perf_counter()
            writer.verify(uri, "raw")
    finally:
        se.detach_image(REPO, disk)
    during = mib_per_s(writer.writes, t1, t2)
    print(f"guest_write_mib_per_s_during_commit: {during:.1f}")
    print(f"commit_seconds_during_writes: {t2 - t1:.3f}")
    print(f"guest_write_throughput_during_commit_ratio: {during / alone:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--size-mib", type=int, default=1024, help="data committed and pulled")
    parser.add_argument("--quick", action="store_true", help="the same with 64 MiB")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="live snapshots under writes, and runs of each side of the job comparisons",
    )
    parser.add_argument(
        "--figures",
        default="snapshot,commit,pull,throughput",
        help="which figures to measure, comma-separated",
    )
    parser.add_argument(
        "--commit-bandwidth-mib",
        type=int,
        default=None,
        help="the limit of the commit that the writer's throughput is measured during",
    )
    args = parser.parse_args()
    wanted = set(args.figures.split(","))
    size = (64 if args.quick else args.size_mib) * MiB
    # Short: the daemon's Unix sockets live under the state directory (108 bytes at most).
    work = tempfile.mkdtemp(prefix="sbl-", dir=args.dir)
    state_dir = os.path.join(work, "s")
    qemu = QemuImg()
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    print(f"data_mib: {size // MiB}")
    skipped: list[str] = []

    def figure(name: str, measure: Callable[[], None]) -> None:
        try:
            measure()
        except Skipped as e:
            print(f"{name}: skipped ({e})")
            skipped.append(name)

    try:
        se = StorageEngine("bench", state_dir=state_dir, poll_interval=0.05)
        try:
            repo = os.path.join(work, "repo")
            os.mkdir(repo)
            se.create_storage_repository("localfs-1.0", {"path": repo})
            se.connect_storage_repository(REPO, "localfs-1.0", {"path": repo})

            if "snapshot" in wanted:
                figure(
                    "live_snapshot_write_stall_ratio",
                    lambda: write_latency(se, size, args.rounds),
                )

            def job_ratio(
                baseline: Callable[[], float],
                ours: Callable[[], float],
                names: tuple[str, str, str],
            ) -> Callable[[], None]:
                """The job through the engine against its qemu-img baseline, alternating;
                ``names``: the baseline's seconds, ours, and the ratio."""

                def measure() -> None:
                    theirs_name, ours_name, ratio_name = names
                    mine, theirs = alternate(args.rounds, baseline, ours, theirs_name)
                    print(f"{ours_name}: {mine:.3f}")
                    print(f"{ratio_name}: {mine / theirs:.2f}")

                return measure

            if "commit" in wanted:
                figure(
                    "live_commit_ratio_vs_qemu_img_commit",
                    job_ratio(
                        lambda: commit_baseline(se, qemu, size),
                        lambda: live_commit(se, qemu, size),
                        (
                            "qemu_img_commit_seconds",
                            "live_commit_seconds",
                            "live_commit_ratio_vs_qemu_img_commit",
                        ),
                    ),
                )
            if "pull" in wanted:
                figure(
                    "pull_ratio_vs_qemu_img_rebase",
                    job_ratio(
                        lambda: rebase_baseline(se, qemu, size),
                        lambda: live_pull(se, qemu, size),
                        (
                            "qemu_img_rebase_seconds",
                            "live_pull_seconds",
                            "pull_ratio_vs_qemu_img_rebase",
                        ),
                    ),
                )
            limit = None if args.commit_bandwidth_mib is None else args.commit_bandwidth_mib * MiB
            if "throughput" in wanted:
                figure(
                    "guest_write_throughput_during_commit_ratio",
                    lambda: throughput_during_commit(se, qemu, size, limit),
                )
        finally:
            se.close()  # lets go of the daemon, which keeps serving by design (docs/adr/0027)
    finally:
        StorageDaemon(state_dir).stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
