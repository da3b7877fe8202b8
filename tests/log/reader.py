"""A reader process for the multi-process log tests: ``python reader.py MODE LOGDIR HOST ...``.

Prints one JSON line: how many records it read and a digest of the order it read them in
(sequence, aggregate, version), so that readers in separate processes can be compared. Modes:

``once``
    opens the log (which verifies every segment) and reads it all.
``follow TIMEOUT``
    prints ``ready``, then calls ``refresh()`` in a loop while writers append, until it has seen
    as many records as the number the test writes to its stdin (once it knows), or TIMEOUT
    seconds passed. After every refresh it checks that it holds whole
    transactions only; states that start ``txn:<host>:<t>:<i>:<n>:`` (see appender.py) are also
    checked to arrive contiguous and in order. Any breach raises, so the exit status says it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

from engine.log import OperationLog, Record


class OrderDigest:
    def __init__(self) -> None:
        self.count = 0
        self._hash = hashlib.blake2b(digest_size=16)

    def add(self, record: Record) -> None:
        if record.seq != self.count + 1:
            raise AssertionError(f"read seq {record.seq} after {self.count} records")
        self.count += 1
        self._hash.update(
            f"{record.seq} {record.originator_id} {record.originator_version}\n".encode()
        )

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class TransactionChecker:
    """Fails on any record that shows part of a transaction without the rest of it."""

    def __init__(self) -> None:
        self.open: int | None = None  # first seq of a transaction begun and not yet ended
        self._next: tuple[bytes, bytes, int] | None = None  # tagged: host, txn, next index

    def add(self, record: Record) -> None:
        tag = None
        if record.state.startswith(b"txn:"):
            _, host, txn, i, n = record.state.split(b":", 5)[:5]
            index, size = int(i), int(n)
            tag = (host, txn, index)
            if self.open is None and index != 0:
                raise AssertionError(f"seq {record.seq} starts with event {index} of {txn!r}")
            if record.txn_last != (index == size - 1):
                raise AssertionError(f"seq {record.seq}: txn_last is {record.txn_last} at {i!r}")
        # An untagged transaction (another mode's) is only known to end where txn_last says.
        if self.open is not None and tag != self._next:
            raise AssertionError(f"seq {record.seq} breaks into the transaction at {self.open}")
        if record.txn_last:
            self.open, self._next = None, None
        else:
            self.open = record.seq if self.open is None else self.open
            self._next = None if tag is None else (tag[0], tag[1], tag[2] + 1)

    def check_whole(self, last_seq: int) -> None:
        if self.open is not None:
            raise AssertionError(
                f"after a refresh to {last_seq} the transaction at {self.open} is open"
            )


def once(directory: str, host: str) -> dict[str, object]:
    digest = OrderDigest()
    with OperationLog.open(directory, host) as log:
        for record in log.iter_records():
            digest.add(record)
    return {"count": digest.count, "digest": digest.hexdigest()}


def follow(directory: str, host: str, timeout: float) -> dict[str, object]:
    digest, checker = OrderDigest(), TransactionChecker()
    views = 0  # refreshes that found new records: proof that it followed rather than read once
    deadline = time.monotonic() + timeout
    expected: list[int] = []  # the writers' total, once the test knows it
    threading.Thread(target=lambda: expected.append(int(sys.stdin.readline())), daemon=True).start()
    with OperationLog.open(directory, host) as log:
        print("ready", flush=True)
        seen = 0
        while not (expected and seen >= expected[0]) and time.monotonic() < deadline:
            last = log.refresh()
            if last == seen:
                time.sleep(0.001)
                continue
            views += 1
            for record in log.iter_records(seen + 1):
                digest.add(record)
                checker.add(record)
            checker.check_whole(last)
            seen = last
    return {"count": digest.count, "digest": digest.hexdigest(), "views": views}


def main(argv: list[str]) -> None:
    mode, directory, host = argv[1], argv[2], argv[3]
    if mode == "once":
        result = once(directory, host)
    elif mode == "follow":
        result = follow(directory, host, float(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
