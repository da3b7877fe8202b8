"""Witnesses that records were committed, so that a cut log is damage and not a torn tail.

A crash in the middle of an append leaves a torn record at the end of the last segment, which
the next appender cuts. Bytes lost from the end of a segment after they were committed (a
restored file, a truncation, a removed last segment) look just the same: only a tail that no
host ever acknowledged may be cut (docs/adr/0018-witnesses-of-committed-records.md).

So each appending host keeps a witness of what it committed: ``log/witnesses/<host_id>``, one
512-byte record rewritten in place after each durable commit, holding the sequence number and
chain hash of the last record it committed. It is not synced: it is written only after the
records it names are durable, so it may lag behind them but never run ahead. A log that ends
before a witness's sequence, or whose record there has another hash, was cut or replaced.

The witnesses live inside ``log/`` rather than in the hosts' liveness files so that older
versions of Strata, which read every file of ``hosts/`` as a heartbeat and only the segment
files of ``log/``, are not disturbed by them.

Imports: msgpack; the standard library.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass

import msgpack

WITNESS_DIR = "witnesses"
_RECORD_SIZE = 512
_MAGIC = b"STRWITN1"


@dataclass(frozen=True, slots=True)
class Witness:
    """Host ``host_id`` committed (or read, once committed) records up to ``seq``, whose
    chain hash is ``hash``."""

    host_id: str
    seq: int
    hash: bytes


def encode(witness: Witness) -> bytes:
    body: bytes = msgpack.packb([witness.host_id, witness.seq, witness.hash])
    data = _MAGIC + zlib.crc32(body).to_bytes(4, "big") + len(body).to_bytes(4, "big") + body
    return bytes(data.ljust(_RECORD_SIZE, b"\0"))


def decode(data: bytes) -> Witness | None:
    """The witness in ``data``, or None if it is torn or not a witness."""
    if len(data) < 16 or not data.startswith(_MAGIC):
        return None
    crc, length = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
    body = data[16 : 16 + length]
    if len(body) != length or zlib.crc32(body) != crc:
        return None
    try:
        host_id, seq, digest = msgpack.unpackb(body)
    except (ValueError, TypeError):
        return None
    if not isinstance(host_id, str) or not isinstance(seq, int) or not isinstance(digest, bytes):
        return None
    return Witness(host_id, seq, digest)


class WitnessWriter:
    """This host's witness file in one log directory. Best effort: a witness that cannot be
    written (read-only storage, no permission) only weakens the check, so failures are kept in
    :attr:`last_error` and never raised to the appender whose records are already durable."""

    def __init__(self, log_dir: str, host_id: str) -> None:
        self._dir = os.path.join(log_dir, WITNESS_DIR)
        self._path = os.path.join(self._dir, host_id)
        self._host_id = host_id
        self._fd = -1
        self.last_error: OSError | None = None

    def write(self, seq: int, digest: bytes) -> None:
        try:
            if self._fd < 0:
                self._fd = self._open()
            os.pwrite(self._fd, encode(Witness(self._host_id, seq, digest)), 0)
        except OSError as e:
            self.last_error = e
            self.close()  # opened again at the next commit: the fault may be gone by then
        else:
            self.last_error = None

    def _open(self) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._dir, 0o755)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(self._path, flags, 0o644)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def read_witnesses(log_dir: str) -> list[Witness]:
    """Every readable witness of the log in ``log_dir`` (none where there are none)."""
    directory = os.path.join(log_dir, WITNESS_DIR)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []  # no witness yet (a log written before witnesses), or none readable here
    found = []
    for name in names:
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            data = os.pread(fd, _RECORD_SIZE, 0)
        except OSError:
            continue
        finally:
            os.close(fd)
        witness = decode(data)
        if witness is not None:
            found.append(witness)
    return found
