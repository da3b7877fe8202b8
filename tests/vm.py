"""The virtual machine as the tests play it: ``qemu-io`` on whatever it opens (a volume file, or
an attached image's NBD address), raising on any failure; :class:`Writer`, one that keeps writing
while an operation runs."""

from __future__ import annotations

import subprocess
import threading
import time
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


class Writer:
    """A virtual machine that keeps writing while an operation runs: one ``qemu-io`` process on
    ``target`` (an export's address), each write a distinct pattern into the next ``block`` of
    the disk, recorded in ``acknowledged`` (offset, pattern) only once ``qemu-io`` confirms it.

    ``start()``, then ``stop()``, which returns what was acknowledged and raises if a write
    failed; ``process`` is for the test's finalizer to kill.
    """

    def __init__(self, target: str, size: int, *, block: int = 4096, pause: float = 0.001) -> None:
        self.process = subprocess.Popen(
            ["qemu-io", "-f", "raw", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.acknowledged: list[tuple[int, int]] = []
        self.failure: str | None = None
        self._slots = size // block
        self._block = block
        self._pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="writer", daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 30.0) -> int:
        """Wait until ``count`` writes are acknowledged; returns how many are."""
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count:
            if self.failure is not None or not self._thread.is_alive():
                raise AssertionError(f"the writer stopped: {self.failure}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.acknowledged)} writes in {timeout} s")
            time.sleep(0.005)
        return len(self.acknowledged)

    def stop(self) -> list[tuple[int, int]]:
        self._stop.set()
        self._thread.join(30)
        if self.failure is not None:
            raise AssertionError(f"a write failed: {self.failure}")
        return list(self.acknowledged)

    def _write(self) -> None:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        for i in range(self._slots):
            if self._stop.is_set():
                break
            offset, pattern = i * self._block, 0x20 + i % 0xDF  # never the tests' base 0x11
            stdin.write(f"write -P {pattern:#x} {offset} {self._block}\n")
            stdin.flush()
            answer = stdout.readline()
            if "wrote " not in answer:
                self.failure = answer.strip() or "qemu-io ended"
                break
            stdout.readline()  # the line of statistics that follows
            self.acknowledged.append((offset, pattern))
            time.sleep(self._pause)
        stdin.close()
        self.process.wait()
