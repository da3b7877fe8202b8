"""Durable appends through the eventsourcing application, against raw fsync and against SQLite.

    python bench/log_append.py [--dir DIR] [--saves N] [--threads T] [--seconds S]

Prints ``name: value`` lines:

* ``commit_latency_ratio_vs_fsync``: median time of ``app.save()`` of an aggregate that records
  one event (mapper, transcoder, recorder, log append, fdatasync), over the median time of one
  ``os.write`` + ``os.fsync`` of the same number of bytes to a file in the same directory. The
  two are measured interleaved, in the same run, so drift in the disk hits both alike.
* ``throughput_ratio_vs_eventsourcing_sqlite``: events per second with ``--threads`` threads
  saving one-event aggregates through our application, over the same load through an
  eventsourcing application on its SQLite recorder (a file on the same filesystem, WAL journal,
  ``PRAGMA synchronous=FULL`` set on each of its connections, so each commit is durable). Both
  use the same msgpack transcoder, so the ratio compares storage, not encoding.

Temporary files go under ``--dir`` (default: the system temporary directory); the filesystem
used is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import singledispatchmethod
from pathlib import Path
from typing import Any

from _about import interpreter
from eventsourcing.application import Application
from eventsourcing.persistence import Transcoder
from eventsourcing.sqlite import SQLiteFactory

from engine.aggregates.topics import StableTopic
from engine.application import LogConfig, StrataLogApplication, save_collected
from engine.persistence import default_transcoder


class Sample(StableTopic):
    """A one-event aggregate: the smallest durable unit of work an application saves."""

    TOPIC = "strata.bench.Sample"

    @dataclass(frozen=True, kw_only=True)
    class Recorded(StableTopic):
        TOPIC = "strata.bench.Sample.Recorded"

        originator_id: uuid.UUID
        originator_version: int
        timestamp: datetime
        host_id: str
        note: str
        size: int

    def __init__(self) -> None:
        self._pending: list[Sample.Recorded] = []

    @classmethod
    def record(cls, note: str, size: int, at: datetime) -> Sample:
        sample = cls()
        event = cls.Recorded(
            originator_id=uuid.uuid4(),
            originator_version=1,
            timestamp=at,
            host_id="host-a",
            note=note,
            size=size,
        )
        sample.apply(event)
        sample._pending.append(event)
        return sample

    def collect_events(self) -> list[Sample.Recorded]:
        events, self._pending = self._pending, []
        return events

    @singledispatchmethod
    def apply(self, event: Sample.Recorded) -> None:
        self.id, self.version, self.note = event.originator_id, event.originator_version, event.note

    @classmethod
    def project(cls, sample: Sample | None, events: Iterable[Sample.Recorded]) -> Sample | None:
        for event in events:
            sample = sample or cls()
            sample.apply(event)
        return sample


NOTE = "volume 3f6c created in repository r1 as a qcow2 overlay of snapshot 9a1e"


def new_sample() -> Sample:
    return Sample.record(NOTE, 10 * 2**30, datetime.now(UTC))


class SQLiteApplication(Application[uuid.UUID]):
    """eventsourcing's own SQLite persistence, made durable, with our transcoder and save."""

    def __init__(self, db_path: str) -> None:
        super().__init__(
            env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": db_path}
        )

    def construct_transcoder(self) -> Transcoder:
        return default_transcoder()

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        return save_collected(self, *objs, **kwargs)  # the same save path as ours

    def construct_factory(self, env: Any) -> Any:
        factory = super().construct_factory(env)
        assert isinstance(factory, SQLiteFactory)
        pool = factory.datastore.pool
        create = pool._create_connection

        # The library opens WAL-mode connections but leaves `synchronous` at SQLite's default;
        # set FULL on every connection it makes, so each commit waits for its fsync.
        def create_durable() -> Any:
            connection = create()
            connection._sqlite_conn.execute("PRAGMA synchronous=FULL")
            return connection

        pool._create_connection = create_durable  # type: ignore[method-assign]
        return factory


def sqlite_settings(db_path: str) -> str:
    conn = sqlite3.connect(db_path)
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    return f"journal_mode={mode}, synchronous=FULL (set per connection)"


def filesystem_of(path: str) -> str:
    best = ("?", "?")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount, fstype, *_ = line.split()
            if path.startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[0]):
                best = (mount, f"{fstype} on {device}")
    return f"{best[1]} (mounted at {best[0]})"


def segment_bytes(log_dir: str) -> int:
    return sum(p.stat().st_size for p in Path(log_dir).glob("segment-*.log"))


def commit_latency(work: str, saves: int) -> tuple[float, float, int]:
    """Median microseconds of one save and of one raw write+fsync of the same size."""
    log_dir = os.path.join(work, "latency-log")
    with StrataLogApplication(LogConfig(log_dir=log_dir, host_id="host-a", create=True)) as app:
        for _ in range(20):  # warm up: imports, caches, the first segment blocks
            app.save(new_sample())
        before = segment_bytes(log_dir)
        app.save(new_sample())
        record_size = segment_bytes(log_dir) - before
        payload = os.urandom(record_size)
        fd = os.open(os.path.join(work, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        ours, raw = [], []
        try:
            for _ in range(saves):
                sample = new_sample()
                t0 = time.perf_counter_ns()
                app.save(sample)
                t1 = time.perf_counter_ns()
                os.write(fd, payload)
                os.fsync(fd)
                t2 = time.perf_counter_ns()
                ours.append(t1 - t0)
                raw.append(t2 - t1)
        finally:
            os.close(fd)
    return statistics.median(ours) / 1e3, statistics.median(raw) / 1e3, record_size


def throughput(save: Callable[[Sample], Any], threads: int, seconds: float) -> tuple[int, float]:
    """Events saved by ``threads`` threads saving one-event aggregates for ``seconds``."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start, stop = threading.Barrier(threads + 1), threading.Event()

    def worker(i: int) -> None:
        start.wait()
        try:
            while not stop.is_set():
                save(new_sample())
                counts[i] += 1
        except BaseException as e:
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def compare_throughput(
    ours: Callable[[Sample], Any],
    theirs: Callable[[Sample], Any],
    threads: int,
    seconds: float,
    rounds: int,
) -> tuple[float, float]:
    """Events/s of each, measured in alternating rounds so that load from elsewhere on the
    machine (other processes' fsyncs, CPU) falls on both sides alike."""
    totals = {"ours": [0, 0.0], "theirs": [0, 0.0]}
    for _ in range(rounds):
        for name, save in (("ours", ours), ("theirs", theirs)):
            count, elapsed = throughput(save, threads, seconds / rounds)
            totals[name][0] += count
            totals[name][1] += elapsed
    return (
        totals["ours"][0] / totals["ours"][1],
        totals["theirs"][0] / totals["theirs"][1],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="per side, in all rounds")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="strata-bench-append-", dir=args.dir)
    try:
        print(f"work_dir: {work}")
        print(f"interpreter: {interpreter()}")
        print(f"filesystem: {filesystem_of(os.path.realpath(work))}")
        ours_us, fsync_us, record_size = commit_latency(work, args.saves)
        print(f"record_bytes: {record_size}")
        print(f"commit_latency_median_us: {ours_us:.1f}")
        print(f"fsync_latency_median_us: {fsync_us:.1f}")
        print(f"commit_latency_ratio_vs_fsync: {ours_us / fsync_us:.2f}")

        config = LogConfig(log_dir=os.path.join(work, "throughput-log"), host_id="h", create=True)
        db_path = os.path.join(work, "sqlite.db")
        with StrataLogApplication(config) as app, SQLiteApplication(db_path) as sqlite_app:
            ours, theirs = compare_throughput(
                app.save, sqlite_app.save, args.threads, args.seconds, args.rounds
            )
        print(f"sqlite_settings: {sqlite_settings(db_path)}")
        print(f"threads: {args.threads}")
        print(f"events_per_second: {ours:.0f}")
        print(f"sqlite_events_per_second: {theirs:.0f}")
        print(f"throughput_ratio_vs_eventsourcing_sqlite: {ours / theirs:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
