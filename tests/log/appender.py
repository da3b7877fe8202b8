"""A writer process for the multi-process log tests: ``python appender.py MODE LOGDIR HOST ...``.

It opens the log, prints ``ready``, and (except in ``forever`` mode) waits for a line on stdin
so that every writer of a test starts appending at the same moment. Modes:

``single N``
    N single-event transactions to one aggregate of its own (versions 1..N); prints the
    acknowledged sequence numbers as JSON.
``txns N SEED``
    N transactions of 1..5 events to one aggregate of its own. Each event's state starts with
    ``txn:<host>:<t>:<i>:<n>:`` so a reader can tell a whole transaction from part of one.
``forever ACKFILE SEGMENT_SIZE SIZES SEED``
    appends transactions of 1..3 events, ``small`` (up to 20 kB) or ``large`` (1 to 4 MB), until
    killed. After each acknowledged append one JSON line (sequence numbers, aggregate, versions
    and a fingerprint of each state) goes to ACKFILE with one ``write``. A kill loses no line it
    wrote: the page cache outlives the process, and these tests kill processes, not machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import uuid

from engine.log import NewEvent, OperationLog


def _fingerprint(state: bytes) -> str:
    return hashlib.blake2b(state, digest_size=16).hexdigest()


def _ready() -> None:
    print("ready", flush=True)


def single(log: OperationLog, count: int) -> None:
    aggregate = uuid.uuid4()
    _ready()
    sys.stdin.readline()
    seqs = []
    for version in range(1, count + 1):
        seqs += log.append([NewEvent(aggregate, version, "Appended", b"%d" % version)])
    print(json.dumps({"aggregate": str(aggregate), "seqs": seqs}), flush=True)


def txns(log: OperationLog, count: int, seed: int) -> None:
    rng = random.Random(seed)
    aggregate = uuid.uuid4()
    _ready()
    sys.stdin.readline()
    version = 0
    for t in range(count):
        n = rng.randint(1, 5)
        # Up to 3 kB per event: a transaction spans pages, and a reader can see a write that has
        # filled some of its pages only.
        events = [
            NewEvent(
                aggregate,
                version + i + 1,
                "Step",
                f"txn:{log.host_id}:{t}:{i}:{n}:".encode() + rng.randbytes(rng.randint(0, 3000)),
            )
            for i in range(n)
        ]
        log.append(events)
        version += n
    print(json.dumps({"aggregate": str(aggregate), "events": version}), flush=True)


def forever(log: OperationLog, ack_path: str, sizes: str, seed: int) -> None:
    rng = random.Random(seed)
    aggregate = uuid.uuid4()
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # A large event's write takes milliseconds, long enough for a kill to land inside it.
    big = rng.randbytes(4_000_000) if sizes == "large" else b""
    version = 0
    _ready()
    while True:
        events = []
        for _ in range(rng.randint(1, 3)):
            version += 1
            if big:
                state = rng.randbytes(16) + big[: rng.randint(1_000_000, 4_000_000)]
            else:
                state = rng.randbytes(rng.choice([0, 10, 200, 3000, 20_000]))
            events.append(NewEvent(aggregate, version, "Filled", state))
        seqs = log.append(events)
        line = {
            "seqs": seqs,
            "events": [
                [str(e.originator_id), e.originator_version, _fingerprint(e.state)] for e in events
            ],
        }
        os.write(ack, json.dumps(line).encode() + b"\n")


def main(argv: list[str]) -> None:
    mode, directory, host = argv[1], argv[2], argv[3]
    if mode == "single":
        with OperationLog.open(directory, host) as log:
            single(log, int(argv[4]))
    elif mode == "txns":
        with OperationLog.open(directory, host) as log:
            txns(log, int(argv[4]), int(argv[5]))
    elif mode == "forever":
        log = OperationLog.open(directory, host, segment_size=int(argv[5]))
        forever(log, argv[4], argv[6], int(argv[7]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
