"""Cold rebuild of status and fixes from a log of 1M image events, and point-in-time replay.

    python bench/replay.py [--dir DIR] [--events N] [--keep] [--repeat R] [--profile]

Prints ``name: value`` lines:

* ``rebuild_seconds_1m_events``: :func:`engine.projections.point_in_time.replay` over the whole log
  (read-only reader: every frame and the hash chain checked; every event decoded by the
  application's mapper and applied with ``Image.apply`` in a detached view), then every
  image's status and the fixes a check would offer from the log alone. Target: 5 s or less.
* ``replay_until_seconds_1m_events``: the same up to the middle of the log (``--until``).
* ``read_only_seconds``: the baseline, measured in the same run: the same reader over the same
  log with no folding at all. ``rebuild_ratio_vs_read_only`` is the rebuild over it.
* ``decode_only_seconds``: reading plus the mapper's decoding, no folding: where the time goes;
  ``rebuild_{fold,statuses,fixes}_seconds`` split the rebuild into its phases.

The log is written first, fast: the image events are made by the real aggregate (requests,
claims, throttled progress, completions, snapshots, user data, prepare, removals), encoded by
the application's mapper, and appended through :class:`engine.log.OperationLog` in
transactions of ``BATCH`` events. With ``--keep`` the log stays in ``--dir`` and is reused by
the next run with the same ``--events``. Figures are the median of ``--repeat`` runs, with the
log's files in the page cache (the cost measured is the CPU's, not the disk's); the machine's
load average is printed, since other work on it slows every figure (the ratio less).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from _about import interpreter

from engine import validation
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.log import NewEvent, OperationLog
from engine.log.reader import ReadOnlyLog
from engine.projections.log_events import new_mapper, to_event
from engine.projections.point_in_time import Until, replay

BATCH = 10_000
PROGRESS = 8  # throttled progress events per stage
SNAPSHOTS = 4  # per disk
HOSTS = ("host-a", "host-b", "host-c")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=3)
        return self.now


def volume() -> str:
    return ops.volume_ref(uuid.uuid4().hex, "qcow2")


def run_stage(image: Image, host: str, now: Clock) -> None:
    op = image.current_operation()
    if op is None:
        raise RuntimeError(f"image {image.id} has no stage to run")
    epoch = image.claim(op_id=op.op_id, stage=op.done, host_id=host, now=now())
    for k in range(PROGRESS):
        image.progress(
            op_id=op.op_id,
            stage=op.done,
            epoch=epoch,
            percent=(k + 1) * 11,
            host_id=host,
            now=now(),
        )
    image.complete(op_id=op.op_id, stage=op.done, epoch=epoch, host_id=host, now=now())


def disk_life(n: int, now: Clock) -> Iterator[list[Image]]:
    """One disk's life, transaction by transaction: the images each transaction saves."""
    host = HOSTS[n % len(HOSTS)]
    top = volume()
    disk = Image.request(
        image_id=uuid.uuid4(), kind=ops.VIRTUAL_DISK, size=2**30, chain=[top],
        user_data=validation.user_data({"name": f"vm{n:06d}"}), strategy=ops.SPACE, auto_fix=True,
        origin={"how": "blank"}, operations=[ops.plan(uuid.uuid4().hex, "create",
        {"do": "create", "volume": top, "size": 2**30})], host_id=host, now=now(),
    )  # fmt: skip
    yield [disk]
    run_stage(disk, host, now)
    yield [disk]
    snapshots = []
    for _ in range(SNAPSHOTS):
        new_top = volume()
        stage = {"do": "create", "volume": new_top, "size": 2**30, "backing": disk.chain[-1]}
        snap_id = uuid.uuid4()
        frozen = disk.take_snapshot(
            snapshot_id=snap_id, new_top=new_top, host_id=host, now=now(),
            operations=[ops.plan(uuid.uuid4().hex, "snapshot", stage)],
        )  # fmt: skip
        snap = Image.request(
            image_id=snap_id, kind=ops.SNAPSHOT, size=2**30, chain=frozen, user_data=None,
            strategy=ops.SPACE, auto_fix=True, origin={"how": "snapshot"}, operations=[],
            host_id=host, now=now(),
        )  # fmt: skip
        snapshots.append(snap)
        yield [disk, snap]
        run_stage(disk, host, now)
        yield [disk]
    disk.set_user_data(
        user_data=validation.user_data({"name": f"vm{n:06d}", "backup": True}),
        host_id=host,
        now=now(),
    )
    disk.prepare(host_id=host, now=now())
    disk.tear_down(host_id=host, now=now())
    yield [disk]
    for snap in snapshots[:2]:  # two removed snapshots per disk: merges and cleans to offer
        snap.remove(host_id=host, now=now(), reason="rotated")
        yield [snap]


def write_log(log_dir: str, events: int) -> int:
    """Append at least ``events`` events; return how many."""
    mapper = new_mapper()
    now = Clock()
    written = 0
    pending: list[NewEvent] = []
    with OperationLog.create(log_dir, "bench") as log:
        n = 0
        while written + len(pending) < events:
            lives = [disk_life(n + k, now) for k in range(50)]  # fifty disks interleaved
            n += len(lives)
            for transaction in _interleave(lives):
                for image in transaction:
                    for event in image.collect_events():
                        stored = mapper.to_stored_event(event)
                        pending.append(
                            NewEvent(stored.originator_id, stored.originator_version,
                                     stored.topic, stored.state)
                        )  # fmt: skip
                if len(pending) >= BATCH:
                    log.append(pending)
                    written += len(pending)
                    pending = []
        if pending:
            log.append(pending)
            written += len(pending)
    return written


def _interleave(lives: list[Iterator[list[Image]]]) -> Iterator[list[Image]]:
    while lives:
        for life in list(lives):
            try:
                yield next(life)
            except StopIteration:
                lives.remove(life)


def read_only(log_dir: str) -> int:
    count = 0
    for _ in ReadOnlyLog(log_dir).records():
        count += 1
    return count


def decode_only(log_dir: str) -> int:
    mapper = new_mapper()
    count = 0
    for record in ReadOnlyLog(log_dir).records():
        to_event(mapper, record)
        count += 1
    return count


def rebuild(log_dir: str, until: Until | None = None) -> dict[str, float]:
    """One cold rebuild, timed by phase: fold the log, every image's status, the fixes."""
    t0 = time.perf_counter()
    state = replay(log_dir, until)
    t1 = time.perf_counter()
    state.statuses()
    t2 = time.perf_counter()
    state.fixes()
    t3 = time.perf_counter()
    return {"fold": t1 - t0, "statuses": t2 - t1, "fixes": t3 - t2, "total": t3 - t0}


def seconds(work: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the log in --dir, reuse it")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print where a rebuild's time goes")
    args = parser.parse_args(argv)
    work = os.path.join(args.dir, f"strata-bench-replay-{args.events}")
    log_dir = os.path.join(work, "log")
    if not args.keep:
        work = tempfile.mkdtemp(prefix="strata-bench-replay-", dir=args.dir)
        log_dir = os.path.join(work, "log")
    try:
        print(f"work_dir: {work}")
        print(f"interpreter: {interpreter()}")
        if not os.path.isdir(log_dir):
            os.makedirs(work, exist_ok=True)
            t0 = time.perf_counter()
            write_log(log_dir, args.events)
            print(f"write_log_seconds: {time.perf_counter() - t0:.1f}")
        events = read_only(log_dir)  # also brings the files into the page cache
        print(f"events: {events}")
        print(f"log_bytes: {sum(e.stat().st_size for e in os.scandir(log_dir))}")
        print(f"images: {len(replay(log_dir).view.images())}")
        print(f"load_average_before: {os.getloadavg()[0]:.2f}")
        # Interleaved, so that whatever else the machine does weighs on every figure alike.
        rounds: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            rounds.setdefault("read_only", []).append(seconds(lambda: read_only(log_dir)))
            for phase, spent in rebuild(log_dir).items():
                rounds.setdefault(phase, []).append(spent)
            middle = rebuild(log_dir, Until(seq=events // 2))["total"]
            rounds.setdefault("until", []).append(middle)
        rounds["decode_only"] = [seconds(lambda: decode_only(log_dir))]
        print(f"load_average_after: {os.getloadavg()[0]:.2f}")
        median = {name: statistics.median(times) for name, times in rounds.items()}
        scale = 1_000_000 / events
        print(f"read_only_seconds: {median['read_only']:.2f}")
        print(f"decode_only_seconds: {median['decode_only']:.2f}")
        for phase in ("fold", "statuses", "fixes"):
            print(f"rebuild_{phase}_seconds: {median[phase]:.2f}")
        print(f"rebuild_seconds: {median['total']:.2f}")
        print(f"rebuild_seconds_1m_events: {median['total'] * scale:.2f}")
        print(f"replay_until_seconds_1m_events: {median['until'] * scale:.2f}")
        print(f"rebuild_ratio_vs_read_only: {median['total'] / median['read_only']:.2f}")
        print(f"target_met: {median['total'] * scale <= 5.0}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(rebuild, log_dir)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
