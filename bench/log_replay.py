"""Replaying a log of 200k events, against eventsourcing's SQLite recorder reading the same events.

    python bench/log_replay.py [--dir DIR] [--events N] [--page P] [--repeat R]

Prints ``name: value`` lines (``scanner``: ``compiled`` when engine/log/_fastscan is built,
else ``python``; see docs/adr/0008-compiled-fast-path-for-the-log-scanner.md):

* ``replay_events_per_second``: one cold pass over the log with ``engine.log.reader``, the
  read-only reader of auditors and projection rebuilds: every segment read, every frame checked
  against the hash chain (and the last one's checksums), every record decoded;
* ``replay_ratio_vs_eventsourcing_sqlite``: that rate over the rate of eventsourcing's
  ``SQLiteApplicationRecorder`` (a fresh recorder on the database file) returning the same
  events through ``select_notifications`` in pages of ``--page`` (500 by default, the page
  size of the library's own subscriptions);
* ``replay_with_mapper_*``: the same two replays with every event also turned into a domain
  event object by the application's mapper, as a projection would.

Both stores hold the same stored events (same ids, topics and msgpack state) and are written
in large transactions first. Each replay is run ``--repeat`` times, alternating sides, and the
median taken; both read files the page cache already holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from _about import interpreter
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

# A sibling script: run as `python bench/log_replay.py`, its directory is on sys.path.
from log_append import NOTE, Sample, filesystem_of

from engine.aggregates.topics import register_topics
from engine.log import NewEvent, OperationLog
from engine.log.reader import ReadOnlyLog
from engine.log.scan import SCANNER
from engine.persistence import default_transcoder

BATCH = 10_000


def make_events(count: int) -> list[StoredEvent]:
    """``count`` one-event aggregates, as the application's mapper stores them."""
    mapper: Mapper[uuid.UUID] = Mapper(default_transcoder())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    events = []
    for i in range(count):
        event = Sample.Recorded(
            originator_id=uuid.uuid4(),
            originator_version=1,
            timestamp=start + timedelta(milliseconds=i),
            host_id=f"host-{i % 3}",
            note=NOTE,
            size=i * 4096,
        )
        events.append(mapper.to_stored_event(event))
    return events


def write_log(log_dir: str, events: list[StoredEvent]) -> None:
    with OperationLog.create(log_dir, "bench") as log:
        for i in range(0, len(events), BATCH):
            log.append(
                [
                    NewEvent(e.originator_id, e.originator_version, e.topic, e.state)
                    for e in events[i : i + BATCH]
                ]
            )


def sqlite_recorder(db_path: str) -> tuple[SQLiteDatastore, SQLiteApplicationRecorder]:
    datastore = SQLiteDatastore(db_name=db_path)
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    return datastore, recorder


def write_sqlite(db_path: str, events: list[StoredEvent]) -> None:
    datastore, recorder = sqlite_recorder(db_path)
    for i in range(0, len(events), BATCH):
        recorder.insert_events(events[i : i + BATCH])
    datastore.close()


def replay_log(log_dir: str, decode: Callable[[object], object] | None) -> int:
    # One pass, as a projection rebuild or an auditor reads: every segment read, every
    # frame checked against the hash chain, every record decoded.
    count = 0
    for record in ReadOnlyLog(log_dir).records():
        if decode is not None:
            decode(record)
        count += 1
    return count


def replay_sqlite(db_path: str, page: int, decode: Callable[[object], object] | None) -> int:
    datastore, recorder = sqlite_recorder(db_path)
    count, last = 0, 0
    try:
        while True:
            notifications = recorder.select_notifications(last, page, inclusive_of_start=False)
            if not notifications:
                return count
            if decode is not None:
                for notification in notifications:
                    decode(notification)
            count += len(notifications)
            last = notifications[-1].id
    finally:
        datastore.close()


def timed(replay: Callable[[], int], expected: int) -> float:
    t0 = time.perf_counter()
    count = replay()
    elapsed = time.perf_counter() - t0
    if count != expected:
        raise RuntimeError(f"replayed {count} events, wrote {expected}")
    return elapsed


def compare(
    ours: Callable[[], int], theirs: Callable[[], int], expected: int, repeat: int
) -> tuple[float, float]:
    our_times, their_times = [], []
    for _ in range(repeat):
        our_times.append(timed(ours, expected))
        their_times.append(timed(theirs, expected))
    return statistics.median(our_times), statistics.median(their_times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--page", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    register_topics()
    mapper: Mapper[uuid.UUID] = Mapper(default_transcoder())
    work = tempfile.mkdtemp(prefix="strata-bench-replay-", dir=args.dir)
    try:
        print(f"work_dir: {work}")
        print(f"interpreter: {interpreter()}")
        print(f"filesystem: {filesystem_of(os.path.realpath(work))}")
        print(f"scanner: {SCANNER}")
        events = make_events(args.events)
        log_dir, db_path = os.path.join(work, "log"), os.path.join(work, "sqlite.db")
        t0 = time.perf_counter()
        write_log(log_dir, events)
        t1 = time.perf_counter()
        write_sqlite(db_path, events)
        t2 = time.perf_counter()
        del events
        print(f"events: {args.events}")
        print(f"log_bytes: {sum(e.stat().st_size for e in os.scandir(log_dir))}")
        print(f"write_log_seconds: {t1 - t0:.2f}")
        print(f"write_sqlite_seconds: {t2 - t1:.2f}")

        ours, theirs = compare(
            lambda: replay_log(log_dir, None),
            lambda: replay_sqlite(db_path, args.page, None),
            args.events,
            args.repeat,
        )
        print(f"replay_seconds: {ours:.3f}")
        print(f"sqlite_replay_seconds: {theirs:.3f}")
        print(f"replay_events_per_second: {args.events / ours:.0f}")
        print(f"sqlite_replay_events_per_second: {args.events / theirs:.0f}")
        print(f"replay_ratio_vs_eventsourcing_sqlite: {theirs / ours:.2f}")

        decode = mapper.to_domain_event
        ours, theirs = compare(
            lambda: replay_log(log_dir, decode),  # type: ignore[arg-type]
            lambda: replay_sqlite(db_path, args.page, decode),  # type: ignore[arg-type]
            args.events,
            1,
        )
        print(f"replay_with_mapper_events_per_second: {args.events / ours:.0f}")
        print(f"sqlite_replay_with_mapper_events_per_second: {args.events / theirs:.0f}")
        print(f"replay_with_mapper_ratio_vs_eventsourcing_sqlite: {theirs / ours:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
