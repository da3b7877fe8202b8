"""The real log against a plain list that says what it must hold, under random use and crashes.

Hypothesis drives appends (some with versions that must conflict), reopening, reads, and crashes
that cut the newest transaction short. A crash can only lose what was never acknowledged, so it
is modelled as: append a transaction, cut the file somewhere inside that transaction's bytes (as
if the process died before its write reached the disk), and drop it from the model. Segments are
small, so roll-over happens often.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from engine.errors import ConcurrencyConflict
from engine.log import NewEvent, OperationLog, Record
from engine.log.framing import ZERO_HASH, digest, encode_payload, frame
from tests.log import witnesses

SEGMENT_SIZE = 4096
AGGREGATES: list[uuid.UUID | str] = [uuid.UUID(int=n) for n in (1, 2, 3)] + ["vm-a", "vm-b"]
MOVES = {"next": 1, "same": 0, "skip": 2, "back": -1}
# Some random bytes, then a run long enough that a few dozen events fill a 4 KiB segment.
STATES = st.builds(
    lambda head, n: head + bytes(i % 251 for i in range(n)),
    st.binary(max_size=40),
    st.integers(0, 1500),
)


@dataclass(frozen=True)
class Expected:
    host_id: str
    txn_last: bool
    originator_id: uuid.UUID | str
    originator_version: int
    topic: str
    state: bytes


def expected(record: Record) -> Expected:
    return Expected(
        record.host_id,
        record.txn_last,
        record.originator_id,
        record.originator_version,
        record.topic,
        record.state,
    )


def chain_hash(record: Record) -> bytes:
    """What the next record's prev_hash must be: BLAKE2b-256 of this record's whole frame."""
    return digest(frame(encode_payload(record)))


def newest_segment(directory: str) -> str:
    return os.path.join(
        directory, max(n for n in os.listdir(directory) if n.startswith("segment-"))
    )


def torn_files(directory: str) -> set[str]:
    torn = os.path.join(directory, "torn")
    return set(os.listdir(torn)) if os.path.isdir(torn) else set()


class LogAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="strata-log-model-")
        self.directory = os.path.join(self.tmp, "log")
        self.opened = 0
        self.log = OperationLog.create(self.directory, "host-0", segment_size=SEGMENT_SIZE)
        self.model: list[Expected] = []
        # First and last seq of the newest append while it is still the tail a crash could cut:
        # once a later segment exists (even one rolled over by a refused append) it is not.
        self.newest: tuple[int, int] | None = None
        self.newest_in = ""  # the segment file that holds it

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.tmp)

    def versions(self) -> dict[uuid.UUID | str, int]:
        return {e.originator_id: e.originator_version for e in self.model}

    def reopen_as_a_new_process(self) -> None:
        self.log.close()
        self.opened += 1
        host = f"host-{self.opened}"
        self.log = OperationLog.open(self.directory, host, segment_size=SEGMENT_SIZE)

    def append_and_expect(self, events: list[NewEvent], conflict: bool) -> None:
        first = len(self.model) + 1
        if conflict:
            with pytest.raises(ConcurrencyConflict):
                self.log.append(events)
            if newest_segment(self.directory) != self.newest_in:
                self.newest = None
            return
        assert self.log.append(events) == list(range(first, first + len(events)))
        last = len(events) - 1
        host = self.log.host_id
        self.model += [
            Expected(host, i == last, e.originator_id, e.originator_version, e.topic, e.state)
            for i, e in enumerate(events)
        ]
        self.newest = (first, first + last)
        self.newest_in = newest_segment(self.directory)

    @rule(
        txn=st.lists(
            st.tuples(
                st.sampled_from(AGGREGATES),
                st.sampled_from(["next"] * 20 + ["same", "skip", "back"]),
                st.sampled_from(["Created", "Resized", "Removed"]),
                STATES,
            ),
            min_size=1,
            max_size=5,
        ),
        start=st.integers(0, 5),
    )
    def append(self, txn: list[tuple[uuid.UUID | str, str, str, bytes]], start: int) -> None:
        known = self.versions()
        versions: dict[uuid.UUID | str, int] = {}
        events, conflict = [], False
        for aggregate, move, topic, state in txn:
            current = versions.get(aggregate, known.get(aggregate))
            version = start if current is None else max(0, current + MOVES[move])
            conflict |= current is not None and version != current + 1
            versions[aggregate] = version
            events.append(NewEvent(aggregate, version, topic, state))
        event("conflict" if conflict else "append")
        self.append_and_expect(events, conflict)

    @rule(aggregate=st.sampled_from(AGGREGATES), size=st.integers(1000, 3000))
    def append_a_large_event(self, aggregate: uuid.UUID | str, size: int) -> None:
        version = self.versions().get(aggregate, 0) + 1
        state = bytes(i % 253 for i in range(size))
        self.append_and_expect([NewEvent(aggregate, version, "Filled", state)], False)

    @rule()
    def reopen(self) -> None:
        self.reopen_as_a_new_process()

    @precondition(lambda self: self.newest is not None)
    @rule(data=st.data())
    def crash_inside_the_newest_transaction(self, data: st.DataObject) -> None:
        assert self.newest is not None  # the precondition
        first, last = self.newest
        event(f"crash in segment {min(int(self.newest_in[-14:-4]), 3)}")
        length = sum(len(frame(encode_payload(r))) for r in self.log.read(first, last))
        self.log.close()
        path = self.newest_in
        end = os.path.getsize(path)
        cut = data.draw(st.integers(end - length, end - 1), label="cut")
        with open(path, "rb") as f:
            torn_bytes = f.read()[end - length : cut]
        os.truncate(path, cut)
        witnesses.forget_from(self.directory, first)
        del self.model[first - 1 :]
        self.newest = None
        self.reopen_as_a_new_process()
        assert self.log.last_seq == len(self.model)
        if data.draw(st.booleans(), label="append at once"):
            kept_before = torn_files(self.directory)
            aggregate = AGGREGATES[0]
            version = self.versions().get(aggregate, 0) + 1
            self.append_and_expect([NewEvent(aggregate, version, "Recovered", b"")], False)
            kept = torn_files(self.directory) - kept_before
            if torn_bytes:
                [name] = kept
                with open(os.path.join(self.directory, "torn", name), "rb") as f:
                    assert f.read() == torn_bytes
            else:
                assert kept == set()

    @rule(
        start=st.integers(-1, 120),
        stop=st.none() | st.integers(-1, 120),
        limit=st.none() | st.integers(0, 10),
    )
    def read_a_range(self, start: int, stop: int | None, limit: int | None) -> None:
        want = [
            (seq, e)
            for seq, e in enumerate(self.model, start=1)
            if seq >= start and (stop is None or seq <= stop)
        ][:limit]
        got = [(r.seq, expected(r)) for r in self.log.read(start, stop, limit)]
        assert got == want

    @rule(
        aggregate=st.sampled_from(AGGREGATES),
        gt=st.none() | st.integers(-1, 20),
        lte=st.none() | st.integers(-1, 20),
        desc=st.booleans(),
        limit=st.none() | st.integers(1, 5),
    )
    def read_an_aggregate(
        self,
        aggregate: uuid.UUID | str,
        gt: int | None,
        lte: int | None,
        desc: bool,
        limit: int | None,
    ) -> None:
        want = [
            e
            for e in self.model
            if e.originator_id == aggregate
            and (gt is None or e.originator_version > gt)
            and (lte is None or e.originator_version <= lte)
        ]
        want = (want[::-1] if desc else want)[:limit]
        got = self.log.events_of(aggregate, gt=gt, lte=lte, desc=desc, limit=limit)
        assert [expected(r) for r in got] == want

    @invariant()
    def the_log_holds_exactly_the_model(self) -> None:
        records = list(self.log.iter_records(batch=7))
        assert [expected(r) for r in records] == self.model
        assert [r.seq for r in records] == list(range(1, len(self.model) + 1))
        assert self.log.last_seq == len(self.model)
        previous = ZERO_HASH
        for record in records:
            assert record.prev_hash == previous, f"chain broken at seq {record.seq}"
            previous = chain_hash(record)
        versions = self.versions()
        assert {a: self.log.version_of(a) for a in AGGREGATES} == {
            a: versions.get(a) for a in AGGREGATES
        }
        segments = sum(n.startswith("segment-") for n in os.listdir(self.directory))
        event(f"segments: {min(segments, 4)}{'+' if segments >= 4 else ''}")


LogAgainstModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
test_the_log_behaves_like_a_list_of_transactions_through_conflicts_reopens_and_crashes = (
    LogAgainstModel.TestCase
)
