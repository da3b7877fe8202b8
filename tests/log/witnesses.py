"""Making a cut log look like what a crash leaves (engine/log/witness.py).

A crash mid-append leaves a torn transaction that its writer never acknowledged, so no witness
names it. Tests that make a torn tail by cutting a finished append call :func:`forget_from`
for the records they cut: the witnesses then look as they would after a real crash.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.log.witness import WITNESS_DIR, decode


def forget_from(log_dir: str | Path, seq: int) -> None:
    """Remove the witnesses that name record ``seq`` or a later one."""
    directory = os.path.join(log_dir, WITNESS_DIR)
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            witness = decode(f.read())
        if witness is not None and witness.seq >= seq:
            os.unlink(path)
