"""The log shared by real processes: concurrent appenders, followers, and writers killed with -9."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

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
        raise AssertionError(f"{proc.args} did not start: {line!r} {proc.communicate()[1]}")


def tell(proc: subprocess.Popen[str], line: object) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"{line}\n")
    proc.stdin.flush()


def result_of(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{err}"
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


def order_digest(records: Iterable[Record]) -> str:
    """The same digest as reader.py's, over what this process reads."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(f"{r.seq} {r.originator_id} {r.originator_version}\n".encode())
    return h.hexdigest()


def all_records(directory: Path) -> list[Record]:
    with OperationLog.open(str(directory), "checker") as log:
        return list(log.iter_records())


def test_four_processes_appending_at_once_leave_one_order_that_every_reader_sees(tmp_path):
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


def test_a_follower_never_sees_part_of_a_transaction_while_writers_append(tmp_path):
    directory = tmp_path / "log"
    OperationLog.create(str(directory), "creator", segment_size=16_384).close()
    follower = start(READER, "follow", directory, "follower", TIMEOUT)
    wait_ready(follower)
    writers = [start(APPENDER, "txns", directory, f"writer-{n}", 400, n) for n in range(2)]
    for writer in writers:
        wait_ready(writer)
    for writer in writers:
        tell(writer, "go")
    total = sum(int(result_of(writer)["events"]) for writer in writers)  # type: ignore[call-overload]
    tell(follower, total)
    followed = result_of(follower)  # reader.py raises (non-zero exit) on a partial transaction

    records = all_records(directory)
    assert (followed["count"], followed["digest"]) == (total, order_digest(records))
    assert followed["views"] > 10, "the follower did not see the log while it grew"
    assert sum(r.txn_last for r in records) == 800


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


def test_a_writer_killed_at_random_moments_loses_no_acknowledged_append(tmp_path):
    rng = random.Random(4021)
    directory = tmp_path / "log"
    OperationLog.create(str(directory), "creator").close()
    acknowledged: dict[int, tuple[str, str, int, str]] = {}
    mine, my_version = uuid.uuid4(), 0
    for trial in range(24):
        # Every other writer rolls over on each append, so kills also land in a roll-over.
        segment_size = 4096 if trial % 2 else 2**20
        host, acks = f"child-{trial}", tmp_path / f"acks-{trial}.jsonl"
        child = start(APPENDER, "forever", directory, host, acks, segment_size, trial)
        wait_ready(child)
        time.sleep(rng.uniform(0, 0.2))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        new = read_acks(acks, host)
        assert new, f"trial {trial}: the child acknowledged nothing before the kill"
        acknowledged.update(new)

        with OperationLog.open(str(directory), "parent", segment_size=segment_size) as log:
            for seq in new:
                assert as_acked(log.read(seq, seq)[0]) == new[seq], f"trial {trial}, seq {seq}"
            last = log.last_seq
            my_version += 1
            state = b"after trial %d" % trial
            assert log.append([NewEvent(mine, my_version, "Checked", state)]) == [last + 1]
            [record] = log.read(last + 1)
            assert (record.originator_id, record.originator_version, record.state) == (
                mine,
                my_version,
                state,
            )

    records = all_records(directory)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    by_seq = {r.seq: r for r in records}
    assert {seq: as_acked(by_seq[seq]) for seq in acknowledged} == acknowledged
    assert [r.originator_version for r in records if r.originator_id == mine] == list(range(1, 25))


def test_strata_log_verify_passes_on_a_log_that_several_processes_wrote(tmp_path):
    directory = tmp_path / "log"
    OperationLog.create(str(directory), "creator", segment_size=4096).close()
    writers = [start(APPENDER, "txns", directory, f"writer-{n}", 100, n) for n in range(2)]
    for writer in writers:
        wait_ready(writer)
    for writer in writers:
        tell(writer, "go")
    for writer in writers:
        result_of(writer)
    verify = subprocess.run(
        [sys.executable, "-m", "log_tools", "verify", str(directory)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    segment = directory / "segment-0000000001.log"
    with open(segment, "r+b") as f:
        f.seek(os.path.getsize(segment) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    damaged = subprocess.run(
        [sys.executable, "-m", "log_tools", "verify", str(directory)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert damaged.returncode != 0, damaged.stdout + damaged.stderr
