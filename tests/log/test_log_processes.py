"""The log shared by real processes: concurrent appenders, followers, and writers killed with -9."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.log import NewEvent, OperationLog, Record

HERE = Path(__file__).parent
APPENDER = HERE / "appender.py"
READER = HERE / "reader.py"
TIMEOUT = 120


def start(script: Path, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"{proc.args!r} did not start: {line!r} {proc.communicate()[1]}")


def tell(proc: subprocess.Popen[str], line: object) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"{line}\n")
        proc.stdin.flush()
    except BrokenPipeError:
        _, err = proc.communicate(timeout=TIMEOUT)
        raise AssertionError(f"{proc.args!r} exited {proc.returncode}:\n{err}") from None


def result_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.args!r} exited {proc.returncode}:\n{err}"
    result: dict[str, Any] = json.loads(out.splitlines()[-1])  # the script's JSON line
    return result


def order_digest(records: Iterable[Record]) -> str:
    """The same digest as reader.py's, over what this process reads."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(f"{r.seq} {r.originator_id} {r.originator_version}\n".encode())
    return h.hexdigest()


def strata_log_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "log_tools", "verify", str(directory)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def all_records(directory: Path) -> list[Record]:
    with OperationLog.open(str(directory), "checker") as log:
        return list(log.iter_records())


def test_four_processes_appending_at_once_leave_one_order_that_every_reader_sees(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "log"
    OperationLog.create(str(directory), "creator").close()
    follower = start(READER, "follow", directory, "follower", TIMEOUT)
    wait_ready(follower)
    tell(follower, 10_000)
    writers = [start(APPENDER, "single", directory, f"writer-{n}", 2_500) for n in range(4)]
    for writer in writers:
        wait_ready(writer)
    for writer in writers:
        tell(writer, "go")
    reports = [result_of(writer) for writer in writers]
    followed = result_of(follower)
    audits = [result_of(start(READER, "once", directory, f"auditor-{n}")) for n in range(3)]

    records = all_records(directory)  # opening verifies every checksum and the whole chain
    assert [r.seq for r in records] == list(range(1, 10_001))
    assert len({(r.originator_id, r.originator_version) for r in records}) == 10_000
    for n, report in enumerate(reports):
        own = [r for r in records if r.host_id == f"writer-{n}"]
        assert [r.seq for r in own] == report["seqs"]
        assert {str(r.originator_id) for r in own} == {report["aggregate"]}
        assert [r.originator_version for r in own] == list(range(1, 2_501))
        assert [r.state for r in own] == [b"%d" % v for v in range(1, 2_501)]
    switches = sum(a.host_id != b.host_id for a, b in itertools.pairwise(records))
    assert switches > 100, "the writers took turns instead of appending at the same time"
    expected = order_digest(records)
    assert [a["digest"] for a in audits] == [expected] * 3
    assert [a["count"] for a in audits] == [10_000] * 3
    assert (followed["count"], followed["digest"]) == (10_000, expected)
    assert followed["views"] > 10, "the follower did not see the log while it grew"
    verify = strata_log_verify(directory)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_follower_never_sees_part_of_a_transaction_while_writers_append(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    OperationLog.create(str(directory), "creator", segment_size=16_384).close()
    follower = start(READER, "follow", directory, "follower", TIMEOUT)
    wait_ready(follower)
    writers = [start(APPENDER, "txns", directory, f"writer-{n}", 800, n) for n in range(2)]
    for writer in writers:
        wait_ready(writer)
    for writer in writers:
        tell(writer, "go")
    total = sum(int(result_of(writer)["events"]) for writer in writers)
    tell(follower, total)
    followed = result_of(follower)  # reader.py raises (non-zero exit) on a partial transaction

    records = all_records(directory)
    assert (followed["count"], followed["digest"]) == (total, order_digest(records))
    assert followed["views"] > 10, "the follower did not see the log while it grew"
    assert sum(r.txn_last for r in records) == 1600


def read_acks(path: Path, host: str) -> dict[int, tuple[str, str, int, str]]:
    """seq -> (host, aggregate, version, state fingerprint) for every append the child saw acked."""
    acked: dict[int, tuple[str, str, int, str]] = {}
    if not path.exists():
        return acked
    for line in path.read_bytes().split(b"\n")[:-1]:  # a line cut by the kill has no newline
        ack = json.loads(line)
        for seq, (aggregate, version, fingerprint) in zip(ack["seqs"], ack["events"], strict=True):
            acked[seq] = (host, aggregate, version, fingerprint)
    return acked


def as_acked(record: Record) -> tuple[str, str, int, str]:
    fingerprint = hashlib.blake2b(record.state, digest_size=16).hexdigest()
    return (record.host_id, str(record.originator_id), record.originator_version, fingerprint)


def newest_segment(directory: Path) -> Path:
    return max(directory.glob("segment-*.log"))


def kill_during_a_write(child: subprocess.Popen[str], directory: Path) -> None:
    """SIGKILL the child the moment the log's newest segment changes size: mid-write, mostly."""
    path = newest_segment(directory)
    size = path.stat().st_size
    deadline = time.monotonic() + 5
    while path.stat().st_size == size and time.monotonic() < deadline:
        pass
    child.send_signal(signal.SIGKILL)


class KilledWriters:
    """One log, written by children killed one after another, checked after every kill."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        OperationLog.create(str(directory), "creator").close()
        self.acknowledged: dict[int, tuple[str, str, int, str]] = {}
        self.mine, self.my_version = uuid.uuid4(), 0
        self.trials = 0
        self.tails_cut = 0  # kills that left part of an append behind
        # Reads all along: had it been shown an append that a kill then left torn (and the next
        # appender cut), its history would differ from the log's, or its next read would fail.
        self.follower = start(READER, "follow", directory, "follower", TIMEOUT)
        wait_ready(self.follower)

    def trial(self, segment_size: int, sizes: str, delay: float, *, pounce: bool) -> None:
        n = self.trials = self.trials + 1
        host, acks = f"child-{n}", self.directory.parent / f"{self.directory.name}-acks-{n}"
        child = start(APPENDER, "forever", self.directory, host, acks, segment_size, sizes, n)
        wait_ready(child)
        time.sleep(delay)
        if pounce:
            kill_during_a_write(child, self.directory)
        else:
            child.send_signal(signal.SIGKILL)
        child.communicate()
        new = read_acks(acks, host)
        self.acknowledged.update(new)

        torn = self.directory / "torn"
        kept = len(list(torn.iterdir())) if torn.exists() else 0
        with OperationLog.open(str(self.directory), "parent", segment_size=segment_size) as log:
            for seq in new:
                assert as_acked(log.read(seq, seq)[0]) == new[seq], f"{host} lost seq {seq}"
            last = log.last_seq
            self.my_version += 1
            event = NewEvent(self.mine, self.my_version, "Checked", b"after %d" % n)
            assert log.append([event]) == [last + 1], f"after {host} was killed"
            [record] = log.read(last + 1)
        assert (record.originator_id, record.originator_version, record.state) == (
            event.originator_id,
            event.originator_version,
            event.state,
        )
        self.tails_cut += (len(list(torn.iterdir())) if torn.exists() else 0) > kept

    def check_all(self) -> None:
        records = all_records(self.directory)
        tell(self.follower, len(records))
        followed = result_of(self.follower)
        assert (followed["count"], followed["digest"]) == (len(records), order_digest(records))
        assert followed["views"] >= self.trials, "the follower did not see the log grow"
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        by_seq = {r.seq: r for r in records}
        assert {seq: as_acked(by_seq[seq]) for seq in self.acknowledged} == self.acknowledged
        assert [r.originator_version for r in records if r.originator_id == self.mine] == list(
            range(1, self.trials + 1)
        )
        assert self.acknowledged, "no child lived to see an append acknowledged"


def test_writers_killed_at_random_moments_lose_no_acknowledged_append(tmp_path: Path) -> None:
    rng = random.Random(4021)
    writers = KilledWriters(tmp_path / "log")
    for n in range(20):
        # Every other writer rolls over before each append, so kills also land in a roll-over.
        segment_size = 4096 if n % 2 else 2**20
        writers.trial(segment_size, "small", rng.uniform(0, 0.2), pounce=False)
    writers.check_all()


def test_writers_killed_in_the_middle_of_a_large_write_lose_no_acknowledged_append(
    tmp_path: Path,
) -> None:
    rng = random.Random(4022)
    writers = KilledWriters(tmp_path / "log")
    # Each kill lands mid-write only when the parent wins a race, so try until a few did.
    while writers.trials < 8 or (writers.tails_cut < 3 and writers.trials < 30):
        writers.trial(2**30, "large", rng.uniform(0, 0.05), pounce=True)
    # On a loaded machine every pounce can land in a child's first write: then children given
    # longer lives make sure appends acknowledged before a kill are checked as well.
    for delay in (0.5, 1.0, 2.0, 4.0):
        if writers.acknowledged:
            break
        writers.trial(2**30, "large", delay, pounce=False)
    writers.check_all()
    assert writers.tails_cut >= 1, f"none of {writers.trials} kills landed inside a write"
    shutil.rmtree(writers.directory)  # tens of megabytes nobody needs to inspect


def test_strata_log_verify_passes_on_a_log_that_several_processes_wrote(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    OperationLog.create(str(directory), "creator", segment_size=4096).close()
    writers = [start(APPENDER, "txns", directory, f"writer-{n}", 100, n) for n in range(2)]
    for writer in writers:
        wait_ready(writer)
    for writer in writers:
        tell(writer, "go")
    for writer in writers:
        result_of(writer)
    verify = strata_log_verify(directory)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    segment = directory / "segment-0000000001.log"
    with open(segment, "r+b") as f:
        f.seek(os.path.getsize(segment) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    damaged = strata_log_verify(directory)
    assert damaged.returncode != 0, damaged.stdout + damaged.stderr
