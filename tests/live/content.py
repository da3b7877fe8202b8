"""Reading what an image holds, block by block, while the daemon may still have it open."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.vm import GuestWriter


def block_patterns(path: str, fmt: str, writer: GuestWriter) -> dict[int, int]:
    """The first byte of each of the writer's blocks in the image at ``path`` (its chain read
    as a whole, with ``-U``: the daemon may hold it)."""
    with tempfile.TemporaryDirectory(prefix="strata-read-") as scratch:
        raw = Path(scratch) / "image.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(raw)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        found = {}
        with raw.open("rb") as f:
            for offset in range(writer.start, writer.start + writer.length, writer.block):
                f.seek(offset)
                found[offset] = f.read(1)[0]
        return found


def allowed_at(writer: GuestWriter, since: float, until: float) -> dict[int, set[int]]:
    """For each block, the patterns a point-in-time copy taken between ``since`` and ``until``
    may hold: the last one acknowledged before ``since`` (0: never written), and any sent
    before ``until``."""
    allowed: dict[int, set[int]] = {}
    last_before: dict[int, int] = {}
    for write in writer.writes:
        if write.acked < since:
            last_before[write.offset] = write.pattern
        elif write.sent < until:
            allowed.setdefault(write.offset, set()).add(write.pattern)
    for offset in range(writer.start, writer.start + writer.length, writer.block):
        allowed.setdefault(offset, set()).add(last_before.get(offset, 0))
    return allowed
