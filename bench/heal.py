"""Self-healing data (issue 16): resumable copies, digests and the deep check, each against a
baseline measured in the same run.

    python bench/heal.py [--dir DIR] [--data-mib N] [--check-mib N] [--rounds N] [--quick]

Prints ``name: value`` lines:

* ``resume_rewrite_ratio``: a copy of a snapshot holding ``--data-mib`` of data (default 1024)
  runs in a host process that is killed with SIGKILL (its whole process group: its qemu-nbd
  too) once the copy has passed 90%; another host resumes it. The bytes the resumed attempt
  writes (the kernel's count for its writing qemu-nbd, recorded in its checkpoints) over the
  bytes the killed attempt had not written yet (the bytes an uninterrupted copy of the same
  snapshot writes, measured in the same run, less the killed writer's count, read from
  ``/proc/<pid>/io`` right before the kill). Target <= 1.1.
* ``deep_check_ratio_vs_qemu_img_check``: ``check_storage_repository(r, {"deep": True})`` of a
  repository holding ``--check-mib`` (default 4096) of snapshot data, over ``qemu-img check``
  of every qcow2 volume file plus ``sha256sum`` of every volume file of the same repository,
  alternated, the page cache warm for both (a warm-up of each first). Target <= 1.2.
* ``copy_with_digest_ratio``: ``copy_image`` of a snapshot (which records its digest) over
  ``copy_image`` of a virtual disk with the same content (which does not: a disk is mutable),
  alternated. Target <= 1.1.

Each part prints its seconds too; ``--quick`` shrinks the data for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _about import interpreter

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.hosts.hostlib import HostProcess, events, host_spec, writer_of, written_by

MiB = 2**20


def connect(se: StorageEngine, repos: dict[str, str]) -> None:
    for name, path in repos.items():
        se.connect_storage_repository(name, "localfs-1.0", {"path": path})


def snapshot_with_data(se: StorageEngine, repo: str, data: int) -> tuple[str, str]:
    """A disk holding ``data`` bytes (a pattern, every cluster), and its snapshot."""
    disk = se.create_virtual_disk(repo, data)
    se.wait_for_image(repo, disk, timeout=60)
    prepared = se.prepare_image(repo, disk)
    step = 256 * MiB
    qemu = QemuImg()
    for offset in range(0, data, step):
        qemu.write_pattern(prepared.path, prepared.format, offset, min(step, data - offset), 0x5C)
    se.teardown_image(repo, disk)
    snapshot = se.create_snapshot(repo, disk)
    se.wait_for_image(repo, snapshot, timeout=3600)
    se.wait_for_image(repo, disk, timeout=3600)
    return disk, snapshot


def timed(call: Any) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


# --- copy with and without its digest -------------------------------------------------------


def copy_with_digest(se: StorageEngine, disk: str, snapshot: str, rounds: int) -> None:
    def copy(image: str) -> float:
        def run() -> None:
            copy = se.copy_image("r2", image)
            status = se.wait_for_image("r2", copy, timeout=3600)
            if status.status != "optimized":
                raise RuntimeError(f"copy ended {status}")
            se.remove_image("r2", copy)

        return timed(run)

    with_digest: list[float] = []
    without: list[float] = []
    copy(disk)  # warm-up
    for r in range(rounds):
        sides = [lambda: with_digest.append(copy(snapshot)), lambda: without.append(copy(disk))]
        for i in range(2):
            os.sync()
            sides[(r + i) % 2]()
    a, b = statistics.median(with_digest), statistics.median(without)
    print(f"copy_with_digest_seconds: {a:.3f}")
    print(f"copy_without_digest_seconds: {b:.3f}")
    print(f"copy_with_digest_ratio: {a / b:.2f}")


# --- the deep check -------------------------------------------------------------------------


def deep_check(se: StorageEngine, repo: str, repo_path: str, rounds: int) -> None:
    volumes = sorted(str(p) for p in Path(repo_path, "volumes").iterdir() if p.is_file())

    def baseline() -> None:
        for path in volumes:
            if path.endswith(".qcow2"):
                subprocess.run(["qemu-img", "check", "-U", path], check=True, capture_output=True)
            subprocess.run(["sha256sum", path], check=True, capture_output=True)

    def ours() -> None:
        fixes = se.check_storage_repository(repo, {"deep": True})
        if any(f.type == "mend" for f in fixes):
            raise RuntimeError(f"the deep check found damage in a sound repository: {fixes}")

    mine: list[float] = []
    theirs: list[float] = []
    baseline()
    ours()
    for r in range(rounds):
        sides = [lambda: mine.append(timed(ours)), lambda: theirs.append(timed(baseline))]
        for i in range(2):
            sides[(r + i) % 2]()
    a, b = statistics.median(mine), statistics.median(theirs)
    size = sum(os.path.getsize(p) for p in volumes)
    print(f"deep_check_bytes: {size}")
    print(f"deep_check_seconds: {a:.3f}")
    print(f"qemu_img_check_and_sha256sum_seconds: {b:.3f}")
    print(f"deep_check_ratio_vs_qemu_img_check: {a / b:.2f}")


# --- a copy killed at 90% and resumed -------------------------------------------------------


def checkpoints(repo_path: str, host: str) -> list[dict[str, Any]]:
    return [f for n, h, f in events(repo_path) if n == "StageCheckpointed" and h == host]


def resume(work: str, repos: dict[str, str], snapshot: str, rate: str) -> None:
    """Both copies throttled alike (``rate``), so that 90% can be caught before the end."""
    root = Path(work)
    copy_step = {
        "call": "copy_image",
        "args": ["r2", snapshot],
        "kwargs": {"options": {"strategy": "performance"}},  # raw: data bytes only
        "save": "copy",
    }
    # An uninterrupted copy first: what a whole copy of this snapshot writes.
    whole = HostProcess(
        host_spec("bench-whole", root / "w", repos, slow_rate=rate, steps=[copy_step])
    )
    try:
        copy = whole.saved("copy")
        deadline = time.monotonic() + 3600
        while not any(c["percent"] == 100 for c in checkpoints(repos["r2"], "bench-whole")):
            if time.monotonic() > deadline:
                raise RuntimeError("the uninterrupted copy never finished")
            time.sleep(0.05)
    finally:
        whole.close()
    total = checkpoints(repos["r2"], "bench-whole")[-1]["written"]

    a = HostProcess(host_spec("host-a", root / "a", repos, slow_rate=rate, steps=[copy_step]))
    try:
        copy = a.saved("copy")
        deadline = time.monotonic() + 3600
        while not any(c["percent"] >= 90 for c in checkpoints(repos["r2"], "host-a")):
            if time.monotonic() > deadline:
                raise RuntimeError("the copy never reached 90%")
            time.sleep(0.02)
        a.signal_group(signal.SIGSTOP)  # frozen: its writer's count is what it wrote
        before = written_by(writer_of(a.proc.pid))
    finally:
        a.kill()
    left = total - before
    with StorageEngine(
        "host-b", state_dir=os.path.join(work, "b"), lease_timeout=1.0, poll_interval=0.05
    ) as se:
        connect(se, repos)
        status = se.wait_for_image("r2", copy, timeout=3600)
        if status.status != "optimized":
            raise RuntimeError(f"the resumed copy ended {status}")
        source = se.prepare_image("r1", snapshot)
        target = se.prepare_image("r2", copy)
        same = subprocess.run(["qemu-img", "compare", "-q", source.path, target.path])
        se.teardown_image("r1", snapshot)
        se.teardown_image("r2", copy)
    resumed = checkpoints(repos["r2"], "host-b")
    after = resumed[-1]["written"]
    print(f"resume_total_bytes: {total}")
    print(f"resume_killed_at_percent: {checkpoints(repos['r2'], 'host-a')[-1]['percent']}")
    print(f"resume_written_before_kill_bytes: {before}")
    print(f"resume_left_at_kill_bytes: {left}")
    print(f"resume_restarted_at_offset: {checkpoints(repos['r2'], 'host-a')[-1]['offset']}")
    print(f"resume_written_after_restart_bytes: {after}")
    print(f"resume_rewrite_ratio: {after / left:.3f}")
    print(f"resume_identical: {same.returncode == 0}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--check-mib", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", default="256M", help="copy rate of the killed copy")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.data_mib, args.check_mib, args.rounds = 128, 256, 1
    work = tempfile.mkdtemp(prefix="strata-bench-heal-", dir=args.dir)
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    try:
        repos = {n: os.path.join(work, n) for n in ("r1", "r2", "r3")}
        state = os.path.join(work, "state")
        with StorageEngine("bench", state_dir=state, poll_interval=0.05) as se:
            for path in repos.values():
                os.mkdir(path)
                se.create_storage_repository("localfs-1.0", {"path": path})
            connect(se, repos)
            disk, snapshot = snapshot_with_data(se, "r1", args.data_mib * MiB)
            copy_with_digest(se, disk, snapshot, args.rounds)
        resume(work, repos, snapshot, args.rate)
        with StorageEngine("bench", state_dir=state, poll_interval=0.05) as se:
            connect(se, repos)
            snapshot_with_data(se, "r3", args.check_mib * MiB)
            deep_check(se, "r3", repos["r3"], args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
