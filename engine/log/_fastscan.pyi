"""Types of the C fast path of the log scanner (engine/log/_fastscan.c)."""

from collections.abc import Callable
from typing import Any

from engine.log.framing import Record

def scan_frames(
    buf: bytes,
    pos: int,
    base: int,
    record_type: type[Record],
    records: list[Record],
    offsets: list[int],
    last: int,
    chain_seq: int,
    chain_hash: bytes,
    committed: int,
    end: int,
    good_seq: int,
    good_hash: bytes,
    digests: bytes | None = None,
    /,
) -> tuple[int, int, int, bytes, int, int, int, bytes]: ...
def hash_frames(buf: bytes, /) -> tuple[bytes, int]: ...
def read_frames(
    fd: int, pos: int, size: int, chunk: int, count: int, /
) -> list[tuple[int, int, bytes, bytes, int]]: ...
def blake2b_256(data: bytes, /) -> bytes: ...
def frame_batch(
    batch: list[Any],
    seq: int,
    prev: bytes,
    base: int,
    host_id: str,
    now: int,
    versions: dict[bytes | str, list[Any]],
    pack: Callable[[Any], bytes],
    uuid_type: type,
    conflict: Callable[[Any, Any, int, int], None],
    too_big: Callable[[Any, int], None],
    /,
) -> tuple[bytearray, list[int], list[Any], int, bytes]: ...
def crc32(data: bytes | bytearray, /) -> int: ...
def index_batch(accepted: list[Any], aggregates: dict[bytes | str, list[Any]], /) -> None: ...
