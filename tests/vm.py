"""The virtual machine as the tests play it: ``qemu-io`` on whatever it opens (a volume file, or
an attached image's NBD address), raising on any failure; and :class:`GuestWriter`, a virtual
machine that keeps writing while an operation runs and afterwards proves that nothing it was told
was written has been lost.

Imports: nothing of the engine (tests and ``bench/live.py`` use it alike).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

KiB, MiB = 1024, 1024 * 1024


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; a failure raises ``CalledProcessError`` with its output."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    )


def qemu_io(target: str | Path, fmt: str, *commands: str, read_only: bool = False) -> None:
    """Run ``commands`` (``write -P 0x5a 0 1M``, ``read -P ...``) on ``target``, in order."""
    flags = ["-r"] if read_only else []
    run("qemu-io", *flags, "-f", fmt, target, *(arg for c in commands for arg in ("-c", c)))


@dataclass(frozen=True)
class Write:
    """One acknowledged write: ``sent`` and ``acked`` on ``time.perf_counter``'s clock, and
    ``latency`` as qemu-io timed the request itself (our thread's wake-ups left out)."""

    offset: int
    length: int
    pattern: int
    sent: float
    acked: float
    latency: float


# qemu-io's report of one request: "wrote 65536/65536 bytes at offset 0", then
# "64 KiB, 1 ops; 00.00 sec (60.736 MiB/sec and 971.7805 ops/sec)".
_WROTE = re.compile(r"wrote (\d+)/(\d+) bytes at offset (\d+)")
_OPS = re.compile(r"and ([0-9.]+) ops/sec")
_MISMATCH = re.compile(r"Pattern verification failed at offset (\d+)")


class GuestWriter:
    """A virtual machine writing to ``target``: one long-lived ``qemu-io`` fed one write at a
    time from a thread, each the next block of ``[start, start + length)`` in turn with a pattern
    that differs from the one the block held before, so a lost write reads back as the wrong one.

    A write is recorded only once qemu-io reports it acknowledged; the first error (a failed
    write, qemu-io gone) stops the writer and is kept in :attr:`error`. Use it as a context
    manager: qemu-io is killed on the way out whatever happened.
    """

    def __init__(
        self,
        target: str | Path,
        fmt: str = "raw",
        *,
        start: int = 0,
        length: int = 64 * MiB,
        block: int = 64 * KiB,
        pause: float = 0.0,
    ) -> None:
        if length < block or length % block or start % block:
            raise ValueError(f"{length=} and {start=} must be multiples of {block=}")
        self.target, self.fmt = str(target), fmt
        self.start, self.length, self.block, self.pause = start, length, block, pause
        self.writes: list[Write] = []
        self.error: str | None = None
        self._stopping = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GuestWriter:
        self.start_writing()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()  # also wakes the thread out of its read
        if self._thread is not None:
            self._thread.join(10)
        if process is not None:
            process.wait(10)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def start_writing(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the writer has already started")
        # stderr joins stdout: a failed write is reported there, in its turn.
        self._process = subprocess.Popen(
            ["qemu-io", "-f", self.fmt, self.target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._write_loop, name="guest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Let the write in flight finish, then end qemu-io (which releases the image)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._fail(f"a write took longer than {timeout} s to be acknowledged")
        process = self._process
        if process is not None and process.poll() is None:
            assert process.stdin is not None
            try:
                process.stdin.write("quit\n")
                process.stdin.flush()
                process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait(10)

    def wait_for_writes(self, count: int, timeout: float = 60.0) -> None:
        """Block until ``count`` writes have been acknowledged (raise if the writer failed)."""
        deadline = time.monotonic() + timeout
        while len(self.writes) < count:
            if self.error is not None:
                raise AssertionError(f"the writer failed: {self.error}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.writes)} of {count} writes in {timeout} s")
            time.sleep(0.01)

    def last_patterns(self) -> dict[int, int]:
        """Offset -> the pattern of the last acknowledged write there."""
        return {w.offset: w.pattern for w in self.writes}

    def verify(self, target: str | Path, fmt: str) -> None:
        """Stop, then check that the writer saw no error and that every written block of
        ``target`` (the image, wherever it now is) holds its last acknowledged pattern."""
        self.stop()
        if self.error is not None:
            raise AssertionError(f"the writer saw an error: {self.error}")
        expected = sorted(self.last_patterns().items())
        if not expected:
            raise AssertionError("the writer wrote nothing")
        commands = "".join(f"read -P {p:#04x} {o} {self.block}\n" for o, p in expected)
        result = subprocess.run(
            ["qemu-io", "-r", "-f", fmt, str(target)],
            input=commands + "quit\n",
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        bad = sorted({int(m) // self.block * self.block for m in _MISMATCH.findall(output)})
        reads = output.count(f"read {self.block}/{self.block} bytes")
        if bad or reads != len(expected) or result.returncode != 0:
            patterns = dict(expected)
            lost = ", ".join(f"{o} (expected {patterns.get(o, -1):#04x})" for o in bad[:10])
            raise AssertionError(
                f"{target}: {len(bad)} of {len(expected)} acknowledged writes do not read back"
                f"{': ' + lost if lost else ''}; {reads} reads done, qemu-io exit "
                f"{result.returncode}; output ends {output[-500:]!r}"
            )

    # --- the thread ----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        blocks = self.length // self.block
        n = 0
        try:
            while not self._stopping.is_set():
                offset = self.start + n % blocks * self.block
                # 1..255 (0 is what a block never written reads as), moving on each pass.
                pattern = 1 + (n // blocks + n % blocks) % 255
                sent = time.perf_counter()
                process.stdin.write(f"write -P {pattern:#04x} {offset} {self.block}\n")
                process.stdin.flush()
                latency = self._await_ack(process.stdout, offset)
                self.writes.append(
                    Write(offset, self.block, pattern, sent, time.perf_counter(), latency)
                )
                n += 1
                if self.pause:
                    self._stopping.wait(self.pause)
        except (OSError, ValueError, AssertionError) as e:
            if not self._stopping.is_set() or process.poll() is None:
                self._fail(str(e))

    def _await_ack(self, out: IO[str], offset: int) -> float:
        line = out.readline()
        wrote = _WROTE.search(line)
        if wrote is None:
            raise AssertionError(
                f"write at {offset}: {line.strip()!r}" if line else "qemu-io ended"
            )
        done, asked, at = (int(g) for g in wrote.groups())
        if done != asked or at != offset:
            raise AssertionError(f"write at {offset}: {line.strip()!r}")
        ops = _OPS.search(out.readline())
        if ops is None:
            raise AssertionError(f"write at {offset}: no timing from qemu-io")
        return 1.0 / float(ops.group(1))

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
