"""The virtual machine as the tests play it: ``qemu-io`` on whatever it opens (a volume file, or
an attached image's NBD address), raising on any failure."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; a failure raises ``CalledProcessError`` with its output."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    )


def qemu_io(target: str | Path, fmt: str, *commands: str, read_only: bool = False) -> None:
    """Run ``commands`` (``write -P 0x5a 0 1M``, ``read -P ...``) on ``target``, in order."""
    flags = ["-r"] if read_only else []
    run("qemu-io", *flags, "-f", fmt, target, *(arg for c in commands for arg in ("-c", c)))
