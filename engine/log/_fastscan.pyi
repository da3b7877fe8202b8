"""Types of the C fast path of the log scanner (engine/log/csrc/fastscan.c)."""

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
def blake2b_256(data: bytes, /) -> bytes: ...
