"""What a caller of the operation log can count on, one behaviour per test."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.errors import ConcurrencyConflict, InvalidParameter, LogClosed, StorageError
from engine.log import NewEvent, OperationLog, framing
from engine.log.batch import EventToAppend
from engine.log.group_commit import Request
from engine.log.segments import read_header


def event(aggregate: uuid.UUID | str, version: int, state: bytes = b"x") -> NewEvent:
    return NewEvent(aggregate, version, "Happened", state)


def segment_files(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("segment-"))


def file_digests(directory: str) -> dict[str, bytes]:
    return {
        name: hashlib.sha256(Path(directory, name).read_bytes()).digest()
        for name in segment_files(directory)
    }


def test_create_refuses_a_directory_that_already_holds_a_log(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("a", 1)])
    before = file_digests(log_dir)
    with pytest.raises(InvalidParameter):
        OperationLog.create(log_dir, "host-b")
    assert file_digests(log_dir) == before
    with OperationLog.open(log_dir, "host-b") as log:
        assert [r.originator_id for r in log.read()] == ["a"]


def test_a_host_id_with_a_newline_or_other_control_character_is_refused(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("a", 1)])
    before = file_digests(log_dir)
    for bad in ("host-a\n", "host\ta", "host-a\x00"):
        with pytest.raises(InvalidParameter, match="printable"):
            OperationLog.open(log_dir, bad)
    assert file_digests(log_dir) == before


def test_create_accepts_an_existing_empty_directory(log_dir: str) -> None:
    os.mkdir(log_dir)
    with OperationLog.create(log_dir, "host-a") as log:
        assert log.append([event("a", 1)]) == [1]


def test_append_returns_the_sequence_numbers_of_its_events_in_order(log_dir: str) -> None:
    aggregate = uuid.uuid4()
    with OperationLog.create(log_dir, "host-a") as log:
        assert log.append([event(aggregate, 1)]) == [1]
        assert log.append([event(aggregate, 2), event(aggregate, 3), event("b", 1)]) == [2, 3, 4]
        assert log.append([]) == []
        assert log.last_seq == 4
        records = log.read()
    assert [(r.seq, r.originator_id, r.originator_version) for r in records] == [
        (1, aggregate, 1),
        (2, aggregate, 2),
        (3, aggregate, 3),
        (4, "b", 1),
    ]
    assert [r.txn_last for r in records] == [True, False, False, True]
    assert {r.host_id for r in records} == {"host-a"}


def test_a_conflicting_transaction_appends_none_of_its_events(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("a", 1), event("a", 2)])
        size = os.path.getsize(Path(log_dir, "segment-0000000001.log"))
        with pytest.raises(ConcurrencyConflict) as caught:
            log.append([event("b", 1), event("a", 2)])
        assert (caught.value.current, caught.value.attempted) == (2, 2)
        with pytest.raises(ConcurrencyConflict):
            log.append([event("a", 4)])  # skipping a version is a conflict too
        with pytest.raises(ConcurrencyConflict):
            log.append([event("c", 1), event("c", 3)])  # within one transaction as well
        assert log.last_seq == 2
        assert log.version_of("a") == 2
        assert log.version_of("b") is None
        assert os.path.getsize(Path(log_dir, "segment-0000000001.log")) == size
        assert log.append([event("a", 3)]) == [3]


def test_a_new_aggregate_may_start_at_any_version(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        assert log.append([event("late", 7)]) == [1]
        assert log.version_of("late") == 7
        with pytest.raises(ConcurrencyConflict):
            log.append([event("late", 7)])


def test_an_invalid_event_is_refused_before_anything_is_appended(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        for bad in (
            NewEvent("a", -1, "Happened", b""),
            NewEvent("a", 1, "", b""),
            NewEvent("a", 1, "Happened", "not bytes"),  # type: ignore[arg-type]
            NewEvent(42, 1, "Happened", b""),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidParameter):
                log.append([event("good", 1), bad])
        assert log.last_seq == 0


def test_sixteen_threads_appending_at_once_are_all_acknowledged_in_one_contiguous_order(
    log_dir: str,
) -> None:
    acknowledged: dict[int, list[int]] = {}

    def append_hundred(log: OperationLog, n: int) -> None:
        acknowledged[n] = [
            seq for v in range(1, 101) for seq in log.append([event(f"thread-{n}", v)])
        ]

    with OperationLog.create(log_dir, "host-a") as log:
        threads = [threading.Thread(target=append_hundred, args=(log, n)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with OperationLog.open(log_dir, "host-b") as log:
        records = log.read()
    assert sorted(seq for seqs in acknowledged.values() for seq in seqs) == list(range(1, 1601))
    assert [r.seq for r in records] == list(range(1, 1601))
    for n, seqs in acknowledged.items():
        assert [(r.originator_id, r.originator_version) for r in records if r.seq in seqs] == [
            (f"thread-{n}", v) for v in range(1, 101)
        ]


def test_threads_racing_for_one_aggregate_each_win_distinct_versions(log_dir: str) -> None:
    # Racing appends land in the same group commit: the log must refuse all but one of those
    # that claim the same version, even though none of them is on disk yet.
    conflicts = [0] * 8

    def win_fifty(log: OperationLog, n: int) -> None:
        wins = 0
        while wins < 50:
            version = (log.version_of("shared") or 0) + 1
            try:
                log.append([event("shared", version, b"thread %d" % n)])
                wins += 1
            except ConcurrencyConflict:
                conflicts[n] += 1

    with OperationLog.create(log_dir, "host-a") as log:
        threads = [threading.Thread(target=win_fifty, args=(log, n)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with OperationLog.open(log_dir, "host-b") as log:
        records = log.events_of("shared")
    assert [r.originator_version for r in records] == list(range(1, 401))
    assert [r.seq for r in records] == list(range(1, 401))
    assert sorted(r.state for r in records) == sorted([b"thread %d" % n for n in range(8)] * 50)
    assert sum(conflicts) > 0, "the threads never raced"


def test_a_full_segment_rolls_over_to_a_new_one_that_continues_the_chain(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a", segment_size=4096) as log:
        for v in range(1, 41):
            log.append([event("a", v, os.urandom(300))])
        first_segments = file_digests(log_dir)
        for v in range(41, 61):
            log.append([event("a", v, os.urandom(300))])
    assert len(first_segments) >= 3
    after = file_digests(log_dir)
    last = max(first_segments)
    assert {k: v for k, v in after.items() if k < last} == {
        k: v for k, v in first_segments.items() if k < last
    }, "a segment was rewritten after a later one existed"
    with OperationLog.open(log_dir, "host-b") as log:
        records = log.read()
        assert [r.originator_version for r in records] == list(range(1, 61))
        assert [r.originator_version for r in log.read(5, 50)] == list(range(5, 51))
    for number in range(2, len(after) + 1):
        path = os.path.join(log_dir, f"segment-{number:010d}.log")
        fd = os.open(path, os.O_RDONLY)
        try:
            header, _ = read_header(fd, path, number)
        finally:
            os.close(fd)
        first = records[header.first_seq - 1]
        assert header.prev_hash == first.prev_hash, f"segment {number} does not link"


def test_listeners_are_woken_by_an_append(log_dir: str) -> None:
    woken = threading.Event()
    with OperationLog.create(log_dir, "host-a") as log:
        log.listen(woken)
        assert not woken.is_set()
        log.append([event("a", 1)])
        assert woken.is_set()
        woken.clear()
        log.unlisten(woken)
        log.append([event("a", 2)])
        assert not woken.is_set()


def test_refresh_shows_what_another_instance_appended(log_dir: str) -> None:
    woken = threading.Event()
    with (
        OperationLog.create(log_dir, "host-a") as writer,
        OperationLog.open(log_dir, "host-b") as reader,
    ):
        reader.listen(woken)
        writer.append([event("a", 1), event("a", 2)])
        assert reader.last_seq == 0
        assert reader.refresh() == 2
        assert woken.is_set()
        assert [r.originator_version for r in reader.read()] == [1, 2]
        assert reader.version_of("a") == 2


def test_two_instances_in_one_process_exclude_each_other_like_two_processes(log_dir: str) -> None:
    with (
        OperationLog.create(log_dir, "host-a") as one,
        OperationLog.open(log_dir, "host-b") as two,
    ):
        acknowledged: list[int] = []
        lock = threading.Lock()

        def append_many(log: OperationLog, aggregate: str) -> None:
            for v in range(1, 201):
                seqs = log.append([event(aggregate, v), event(aggregate + "-shadow", v)])
                with lock:
                    acknowledged.extend(seqs)

        threads = [
            threading.Thread(target=append_many, args=(log, f"{log.host_id}-{n}"))
            for log in (one, two)
            for n in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(acknowledged) == list(range(1, 3201))
        # Each saw the other's appends under the lock, so a stale version is refused.
        with pytest.raises(ConcurrencyConflict):
            one.append([event("host-b-0", 200)])
    with OperationLog.open(log_dir, "host-c") as log:
        records = log.read()
    assert [r.seq for r in records] == list(range(1, 3201))
    for first, second in zip(records[::2], records[1::2], strict=True):
        assert second.originator_id == f"{first.originator_id}-shadow"
        assert (first.host_id, first.originator_version) == (
            second.host_id,
            second.originator_version,
        )


def test_a_closed_log_refuses_appends_and_reads(log_dir: str) -> None:
    log = OperationLog.create(log_dir, "host-a")
    log.append([event("a", 1)])
    log.close()
    with pytest.raises(LogClosed):
        log.append([event("a", 2)])
    with pytest.raises(LogClosed):
        log.read()


def test_reads_filter_by_range_limit_and_aggregate(log_dir: str) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        for v in range(1, 6):
            log.append([event("a", v), event("b", v)])
        assert [r.seq for r in log.read(3, 6)] == [3, 4, 5, 6]
        assert [r.seq for r in log.read(3, limit=2)] == [3, 4]
        assert [r.seq for r in log.read(9)] == [9, 10]
        assert log.read(11) == []
        assert [r.seq for r in log.iter_records(2, batch=3)] == list(range(2, 11))
        assert [r.originator_version for r in log.events_of("b", gt=1, lte=4)] == [2, 3, 4]
        assert [r.originator_version for r in log.events_of("b", desc=True, limit=2)] == [5, 4]
        assert log.events_of("nobody") == []


def test_a_segment_temporary_left_by_a_crash_is_removed_by_the_next_appender(log_dir: str) -> None:
    # A writer killed inside a roll-over leaves ".segment-N.log.<pid>.tmp" (seen in the kill
    # trials of test_log_processes.py); segments.py promises the next appender removes it.
    with OperationLog.create(log_dir, "host-a") as log:
        stale = Path(log_dir, ".segment-0000000002.log.999999.tmp")
        stale.write_bytes(b"STRATLOG half a header")
        log.append([event("a", 1)])
    assert not stale.exists()


def test_a_limit_of_zero_returns_no_records_from_events_of_as_it_does_from_read(
    log_dir: str,
) -> None:
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("a", 1), event("a", 2)])
        assert log.read(1, limit=0) == []
        assert log.events_of("a", limit=0) == []


def test_a_failed_sync_is_undone_and_the_log_goes_on(
    log_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync that fails leaves the records' fate unknown: they are cut off again under the
    lock, so that nobody reads them as committed, the caller gets a typed error, and the next
    append works once the storage does."""
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("first", 1)])

        def fail(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr("engine.log.store.os.fdatasync", fail)
        with pytest.raises(StorageError) as raised:
            log.append([event("unsure", 1)])
        assert raised.value.errno == 5
        monkeypatch.undo()
        assert log.append([event("after", 1)]) == [2]
    with OperationLog.open(log_dir, "host-b") as log:
        assert [r.originator_id for r in log.read()] == ["first", "after"]


def test_an_interrupted_sync_leaves_the_append_to_be_read_again(
    log_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted between write and sync, the append may or may not be on the disk: the
    next append reads the tail again rather than write over records a reader may have seen."""
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("first", 1)])

        def interrupt(fd: int) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr("engine.log.store.os.fdatasync", interrupt)
        with pytest.raises(KeyboardInterrupt):
            log.append([event("unsure", 1)])
        monkeypatch.undo()
        log.append([event("after", 1)])
    with OperationLog.open(log_dir, "host-b") as log:
        # The unsure record reached the page cache whole, so it reads back as committed; what
        # matters is that nothing was written over it.
        assert [r.originator_id for r in log.read()] == ["first", "unsure", "after"]


def test_a_refused_request_in_a_group_gives_back_the_versions_it_claimed(log_dir: str) -> None:
    """One batch, as a group commit hands it over: a refused request keeps no record and no
    claim, and the requests after it are checked against what the others claimed."""
    with OperationLog.create(log_dir, "host-a") as log:
        log.append([event("a", 1)])
        requests: list[Request[Sequence[EventToAppend]]] = [
            Request([event("a", 2), event("b", 1)]),
            Request([event("b", 2), event("c", 1), event("a", 2)]),  # a is at 2 by now: refused
            Request([event("c", 1), event("b", 2)]),  # c and b as if the refused one never was
            Request([event("a", 3)]),
        ]
        log._commit(requests)
        assert [r.seqs for r in requests] == [[2, 3], [], [4, 5], [6]]
        assert isinstance(requests[1].error, ConcurrencyConflict)
        assert (requests[1].error.current, requests[1].error.attempted) == (2, 2)
        assert [(r.originator_id, r.originator_version) for r in log.read()] == [
            ("a", 1), ("a", 2), ("b", 1), ("c", 1), ("b", 2), ("a", 3),
        ]  # fmt: skip
        assert [r.txn_last for r in log.read()] == [True, False, True, False, True, True]
        assert (log.version_of("a"), log.version_of("b"), log.version_of("c")) == (3, 2, 1)
    with OperationLog.open(log_dir, "auditor") as reopened:  # the chain reads back whole
        assert [r.seq for r in reopened.read()] == [1, 2, 3, 4, 5, 6]


def test_a_record_too_large_is_refused_alone_and_the_rest_of_its_group_is_written(
    log_dir: str,
) -> None:
    """The size limit of a record (framing.MAX_PAYLOAD) refuses that request with a typed
    error, as a conflict does; the other requests of the group are not at fault."""
    too_large = event("big", 1, bytes(framing.MAX_PAYLOAD))
    with OperationLog.create(log_dir, "host-a") as log:
        requests: list[Request[Sequence[EventToAppend]]] = [
            Request([event("a", 1)]),
            Request([event("b", 1), too_large]),
            Request([event("b", 1)]),  # b as if the refused request never was
        ]
        log._commit(requests)
        assert [r.seqs for r in requests] == [[1], [], [2]]
        assert isinstance(requests[1].error, InvalidParameter)
        with pytest.raises(InvalidParameter):
            log.append([too_large])
        assert log.append([event("big", 1)]) == [3]
    with OperationLog.open(log_dir, "auditor") as reopened:
        assert [r.originator_id for r in reopened.read()] == ["a", "b", "big"]
