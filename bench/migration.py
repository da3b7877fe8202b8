"""Live storage migration (``migrate_image`` of an attached disk) against ``qemu-img convert`` of
the same chain, and against a virtual machine's writes without a migration, in the same run.

    python bench/migration.py [--dir DIR] [--size-mib N | --quick] [--rounds N]

Each disk is twice ``--size-mib`` large and holds ``--size-mib`` of data (default 1024; ``--quick``:
64), written spread over it, then snapshotted (the snapshot removed): its chain is a base holding
the data under an empty top, and the migration's own live snapshot puts a third volume on it.
Repositories ``r1`` and ``r2`` share one filesystem. Prints ``name: value`` lines:

* seconds are medians of ``--rounds`` runs of each side, taking turns at going first, on a new
  disk each time;
* ``migration_seconds``: ``migrate_image`` of the attached, idle disk from ``r1`` to ``r2``, from
  the call until ``wait_for_image`` in ``r2`` returns (the merge of the automatic snapshot over,
  the source removed); ``qemu_img_convert_seconds``: ``qemu-img convert -O qcow2`` of a chain made
  the same way into ``r2``'s filesystem, fsync'd; ``migration_ratio_vs_qemu_img_convert`` (target
  <= 1.3);
* ``migration_<step>_seconds``: where a migration's time went, medians, read from the two logs'
  records (``snapshot``, ``clone``, ``sync``, ``mirror``, ``switch`` stages of the source's
  operation, then the ``merge`` in the destination, and ``other``: the call, the executors'
  pick-up between stages, the wait's polling);
* ``median_write_ms``: a writer's median write latency with nothing else going on;
  ``switch_max_write_ms``: the longest latency of a write in flight across the switch (from the
  source's "switch requested" record to the destination's ``ReplicaSwitched``), the worst of
  the rounds; ``switch_write_stall_ratio``: the second over the first (target <= 5). Around it:
  ``switch_window_max_write_ms`` and its ratio, within ``--switch-margin`` (0.5 s) of the
  switch, which take in the end of the mirror's copy and the merge's start;
  ``sync_max_write_ms`` (during the sync stage) and ``merge_max_write_ms`` (during the merge of
  the automatic snapshot in the destination);
* ``guest_write_throughput_mib_s`` and ``guest_write_throughput_during_migration_mib_s``: the
  writer's throughput (64 KiB writes one after the other, no pause) before and during a migration
  of its disk, medians; ``guest_write_throughput_during_migration_ratio`` (target >= 0.5); also
  during the sync stage and during the rest of the migration.

The writer is :class:`tests.vm.GuestWriter`; every write it was told was done is read back from the
destination (its export, then its volume) at the end of each round:
``rounds_with_acknowledged_writes_lost`` counts the rounds where one did not, each then told, and
the script exits 1. A figure whose engine call is refused is printed as ``skipped (why)`` and the
script then exits 1. Every storage daemon it started is stopped at the end.
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
from typing import Any

from _about import interpreter

from engine import StorageEngine
from engine.application import LogConfig, StrataLogApplication
from engine.errors import StrataError
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon

# tests/vm.py plays the virtual machine for the tests and for the benchmarks alike.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.vm import GuestWriter, Write

KiB, MiB = 2**10, 2**20
SRC, DST = "r1", "r2"
STEPS = ("snapshot", "clone", "sync", "mirror", "switch")  # an attached migration's stages
STEP_NAMES = {"create": "snapshot"}  # its live snapshot is a "create" stage


class Skipped(Exception):
    """A figure that cannot be measured on this engine (a call it lacks, or refuses)."""


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Bench:
    def __init__(self, se: StorageEngine, qemu: QemuImg, roots: dict[str, str], data: int) -> None:
        self.se, self.qemu, self.roots, self.data = se, qemu, roots, data
        # Log records carry wall-clock times, the writer perf_counter's: one offset joins them.
        self.wall_minus_perf = time.time() - time.perf_counter()
        self.lost: list[str] = []  # what a round's writer found lost, if anything

    # --- disks -----------------------------------------------------------------------------------
    def disk_with_data(self) -> tuple[str, str]:
        """A disk of twice the data, the data spread over it in its base under an empty top.
        Returns the disk and its top's path."""
        se, qemu = self.se, self.qemu
        disk = se.create_virtual_disk(SRC, 2 * self.data)
        se.wait_for_image(SRC, disk, timeout=60)
        prepared = se.prepare_image(SRC, disk)
        try:
            chunk = min(self.data, 256 * MiB)
            for offset in range(0, self.data, chunk):  # like a used filesystem: holes between
                qemu.write_pattern(prepared.path, prepared.format, offset * 2, chunk, 0x5C)
        finally:
            se.teardown_image(SRC, disk)
        se.remove_image(SRC, se.create_snapshot(SRC, disk))
        se.wait_for_image(SRC, disk, timeout=60)
        top = se.prepare_image(SRC, disk).path
        se.teardown_image(SRC, disk)
        os.sync()
        return disk, top

    # --- one migration ---------------------------------------------------------------------------
    def migrate(self, disk: str) -> tuple[str, float, float]:
        """``migrate_image`` of the attached disk, call to completion; returns its operation,
        when it was called and when it was over (perf_counter)."""
        t0 = time.perf_counter()
        try:
            op_id = self.se.migrate_image(SRC, disk, DST)
        except StrataError as e:
            raise Skipped(f"migrate_image of an attached disk: {e}") from e
        status = self.se.wait_for_image(DST, disk, timeout=3600)
        t1 = time.perf_counter()
        if status.status == "broken" or status.last_error:
            raise Skipped(f"the migration ended {status}")
        return op_id, t0, t1

    def records(self, disk: str) -> list[tuple[str, str, float, dict[str, Any]]]:
        """(repository, event, perf_counter time, fields) of the disk's records in both logs."""
        found = []
        for repo, root in self.roots.items():
            app = StrataLogApplication(
                LogConfig(log_dir=os.path.join(root, "log"), host_id="bench-reader")
            )
            try:
                for record in app.operation_log.read():
                    if str(record.originator_id) != disk:
                        continue
                    name = record.topic.rsplit(".", 1)[-1]
                    fields = app.mapper.transcoder.decode(record.state)
                    at = record.time_ns / 1e9 - self.wall_minus_perf
                    found.append((repo, name, at, fields))
            finally:
                app.close()
        return found

    def spans(self, disk: str, op_id: str) -> dict[str, tuple[float, float]]:
        """When each stage of the migration ``op_id`` ran (claimed to completed), the merge in
        the destination, and ``switching``: from the source's "switch requested" to the
        destination's ``ReplicaSwitched``."""
        claimed: dict[tuple[str, int], float] = {}
        spans: dict[str, tuple[float, float]] = {}
        asked = None
        steps: list[str] = []
        for repo, name, at, fields in self.records(disk):
            if name == "ReplicaSwitched" and repo == DST and asked is not None:
                spans["switching"] = (asked, at)
            operation = fields.get("operation")
            if isinstance(operation, dict) and operation.get("op_id") == op_id:
                # The order of its stages, as planned.
                steps = [STEP_NAMES.get(st["do"], st["do"]) for st in operation["stages"]]
            if fields.get("op_id") not in (op_id, f"{op_id}-merge"):
                continue
            key = (repo, int(fields["stage"]))
            if name == "StageClaimed":
                claimed[key] = at
            elif name == "StageReached" and fields.get("phase") == "switch requested":
                asked = at
            elif name == "StageCompleted" and key in claimed:
                mine = fields["op_id"] == op_id and key[1] < len(steps)
                step = steps[key[1]] if mine else "merge"
                spans[step] = (claimed.pop(key), at)
        return spans

    def breakdown(self, disk: str, op_id: str, t0: float, t1: float) -> dict[str, float]:
        """Seconds of each stage of the migration, of the merge in the destination, and the
        rest of ``t1 - t0`` (the call, the pick-up between stages, the wait's polling)."""
        spent = {
            step: end - start
            for step, (start, end) in self.spans(disk, op_id).items()
            if step != "switching"
        }
        spent["other"] = (t1 - t0) - sum(spent.values())
        return spent

    # --- the figures -----------------------------------------------------------------------------
    def migration_once(self) -> tuple[float, dict[str, float]]:
        disk, _ = self.disk_with_data()
        self.se.attach_image(SRC, disk)
        try:
            op_id, t0, t1 = self.migrate(disk)
        finally:
            with_retry_detach(self.se, disk)
        return t1 - t0, self.breakdown(disk, op_id, t0, t1)

    def convert_once(self) -> float:
        _, top = self.disk_with_data()
        out = os.path.join(self.roots[DST], f"convert-{time.monotonic_ns()}.qcow2")
        t0 = time.perf_counter()
        self.qemu.convert(top, out, src_fmt="qcow2", dst_fmt="qcow2")
        fsync(out)
        # Left in place: freeing a just-written GiB slows what the filesystem does next.
        return time.perf_counter() - t0

    def under_writes(self, margin: float) -> dict[str, float]:
        """A writer on an attached disk, alone then during its migration: its median latency
        alone, its longest in flight within ``margin`` of the switch, within the switch alone,
        during the sync and during the merge; its throughput alone, during the migration, during
        its sync and during the rest of it."""
        se = self.se
        disk, _ = self.disk_with_data()
        uri = se.attach_image(SRC, disk).nbd_uri
        area = min(self.data, 64 * MiB)
        try:
            with GuestWriter(uri, "raw", length=area) as writer:
                writer.wait_for_writes(2 * area // (64 * KiB), timeout=300)  # all allocated
                calm = len(writer.writes)
                a0 = time.perf_counter()
                writer.wait_for_writes(calm + 500)
                time.sleep(max(0.0, 3 - (time.perf_counter() - a0)))  # at least 3 s of writes
                a1 = time.perf_counter()
                quiet = [w.latency for w in writer.writes[calm:]]
                op_id, t0, t1 = self.migrate(disk)
                writer.wait_for_writes(len(writer.writes) + 50)
                lost = read_back(writer, uri, "raw")  # the export is the destination's now
        finally:
            with_retry_detach(se, disk)
        prepared = se.prepare_image(DST, disk)
        try:
            # And so is the volume on disk.
            lost = lost or read_back(writer, prepared.path, prepared.format)
        finally:
            se.teardown_image(DST, disk)
        if lost is not None:
            self.lost.append(lost)
        spans = self.spans(disk, op_id)
        if "switching" not in spans or "sync" not in spans:
            raise Skipped(f"no switch or no sync in the logs: {sorted(spans)}")
        writes = writer.writes
        asked, switched = spans["switching"]
        sync_start, sync_end = spans["sync"]
        during = mib_per_s(writes, t0, t1)
        during_sync = mib_per_s(writes, sync_start, sync_end)
        rest = t1 - t0 - (sync_end - sync_start)
        return {
            "median": statistics.median(quiet),
            "switch": max(in_flight(writes, asked - margin, switched + margin), default=0.0),
            "switch_only": max(in_flight(writes, asked, switched), default=0.0),
            "sync": max(in_flight(writes, sync_start, sync_end), default=0.0),
            "merge": max(in_flight(writes, *spans.get("merge", (t1, t1))), default=0.0),
            "alone": mib_per_s(writes, a0, a1),
            "during": during,
            "during_sync": during_sync,
            "during_rest": (during * (t1 - t0) - during_sync * (sync_end - sync_start)) / rest,
            "seconds": t1 - t0,
        }


def read_back(writer: GuestWriter, target: str, fmt: str) -> str | None:
    """None if every write the writer was told was done reads back from ``target``; else
    what does not."""
    try:
        writer.verify(target, fmt)
    except AssertionError as e:
        return str(e)
    return None


def with_retry_detach(se: StorageEngine, disk: str) -> None:
    """Detach the disk wherever it lives now (the source's view of it may be gone)."""
    for repo in (DST, SRC):
        try:
            se.detach_image(repo, disk)
            return
        except StrataError:
            continue


def in_flight(writes: list[Write], start: float, end: float) -> list[float]:
    return [w.latency for w in writes if w.sent <= end and w.acked >= start]


def mib_per_s(writes: list[Write], start: float, end: float) -> float:
    done = sum(w.length for w in writes if start <= w.acked <= end)
    return done / MiB / (end - start)


def alternate(
    rounds: int, baseline: Callable[[], float], ours: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """``rounds`` runs of each side, taking turns at going first (the one after a run finds the
    page cache and the disk's writeback as that run left them)."""
    theirs: list[float] = []
    mine: list[float] = []
    for round_ in range(rounds):
        if round_ % 2:
            mine.append(ours())
        theirs.append(baseline())
        if not round_ % 2:
            mine.append(ours())
    return mine, theirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--size-mib", type=int, default=1024, help="data on each 2x-sized disk")
    parser.add_argument("--quick", action="store_true", help="the same with 64 MiB")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side")
    parser.add_argument(
        "--figures", default="migration,writes", help="which figures to measure, comma-separated"
    )
    parser.add_argument(
        "--switch-margin",
        type=float,
        default=0.5,
        help="seconds either side of the switch in which a write's latency counts as its stall",
    )
    args = parser.parse_args()
    wanted = set(args.figures.split(","))
    data = (64 if args.quick else args.size_mib) * MiB
    # Short: the daemon's Unix sockets live under the state directory (108 bytes at most).
    work = tempfile.mkdtemp(prefix="sbm-", dir=args.dir)
    state_dir = os.path.join(work, "s")
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    print(f"data_mib: {data // MiB}")
    print(f"disk_mib: {2 * data // MiB}")
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
            roots = {}
            for repo in (SRC, DST):
                roots[repo] = os.path.join(work, repo)
                os.mkdir(roots[repo])
                se.create_storage_repository("localfs-1.0", {"path": roots[repo]})
                se.connect_storage_repository(repo, "localfs-1.0", {"path": roots[repo]})
            bench = Bench(se, QemuImg(), roots, data)

            def migration() -> None:
                steps: list[dict[str, float]] = []

                def ours() -> float:
                    seconds, spent = bench.migration_once()
                    steps.append(spent)
                    return seconds

                mine, theirs = alternate(args.rounds, bench.convert_once, ours)
                print(f"qemu_img_convert_seconds: {statistics.median(theirs):.3f}")
                print(f"migration_seconds: {statistics.median(mine):.3f}")
                for step in (*STEPS, "merge", "other"):
                    values = [s[step] for s in steps if step in s]
                    if values:
                        print(f"migration_{step}_seconds: {statistics.median(values):.3f}")
                ratio = statistics.median(mine) / statistics.median(theirs)
                print(f"migration_ratio_vs_qemu_img_convert: {ratio:.2f}")

            def writes() -> None:
                runs = [bench.under_writes(args.switch_margin) for _ in range(args.rounds)]

                def median(key: str) -> float:
                    return statistics.median(r[key] for r in runs)

                def worst(key: str) -> float:
                    return max(r[key] for r in runs)

                print(f"median_write_ms: {median('median') * 1000:.3f}")
                print(f"switch_max_write_ms: {worst('switch_only') * 1000:.3f}")
                print(f"switch_window_max_write_ms: {worst('switch') * 1000:.3f}")
                print(f"sync_max_write_ms: {worst('sync') * 1000:.3f}")
                print(f"merge_max_write_ms: {worst('merge') * 1000:.3f}")
                stall = worst("switch_only") / median("median")
                print(f"switch_write_stall_ratio: {stall:.2f}")
                window = worst("switch") / median("median")
                print(f"switch_window_write_stall_ratio: {window:.2f}")
                print(f"migration_seconds_under_writes: {median('seconds'):.3f}")
                print(f"guest_write_throughput_mib_s: {median('alone'):.1f}")
                print(f"guest_write_throughput_during_migration_mib_s: {median('during'):.1f}")
                print(f"guest_write_throughput_during_sync_mib_s: {median('during_sync'):.1f}")
                print(
                    "guest_write_throughput_during_migration_but_sync_mib_s: "
                    f"{median('during_rest'):.1f}"
                )
                ratio = median("during") / median("alone")
                print(f"guest_write_throughput_during_migration_ratio: {ratio:.2f}")

            if "migration" in wanted:
                figure("migration_ratio_vs_qemu_img_convert", migration)
            if "writes" in wanted:
                figure("switch_write_stall_ratio", writes)
                print(f"rounds_with_acknowledged_writes_lost: {len(bench.lost)}")
                for lost in bench.lost:
                    print(f"  {lost[:300]}")
        finally:
            se.close()  # lets go of the daemon, which keeps serving by design (docs/adr/0027)
    finally:
        StorageDaemon(state_dir).stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if skipped or bench.lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
