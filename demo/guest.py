"""The demo's virtual machine: one ``qemu-io`` connected to an attached image's NBD export,
writing from a thread while the live operations run, and afterwards reading every write it was
told had been done back from wherever the image then is.

A small cousin of the tests' writer (the demo imports no tests): each write is the next 64 KiB
block of its range with a pattern that block did not hold before, so a lost write reads back as
the wrong one; a write counts only once qemu-io has reported it done.

Imports: nothing of the engine (it speaks to the export as a guest would).
"""

from __future__ import annotations

import re
import subprocess
import threading

KiB = 1024
_WROTE = re.compile(r"wrote (\d+)/(\d+) bytes at offset (\d+)")


class Guest:
    """Writes ``[start, start + length)`` block after block through ``uri`` until stopped."""

    def __init__(self, uri: str, *, start: int, length: int, block: int = 64 * KiB) -> None:
        self.uri, self.start, self.length, self.block = uri, start, length, block
        self.acknowledged: dict[int, int] = {}  # offset -> the last pattern acknowledged there
        self.count = 0
        self.error: str | None = None
        self._stopping = threading.Event()
        self._process = subprocess.Popen(
            ["qemu-io", "-f", "raw", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # a failed write is reported in its turn
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._write, name="demo-guest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the write in flight finish, then end qemu-io (it lets go of the export)."""
        self._stopping.set()
        self._thread.join(30)
        if self._process.poll() is None:
            try:
                self._process.communicate("quit\n", timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.communicate()

    def reads_back(self, target: str, fmt: str) -> list[int]:
        """The offsets of acknowledged writes that ``target`` does not hold (none: all there)."""
        commands = "".join(
            f"read -P {pattern:#04x} {offset} {self.block}\n"
            for offset, pattern in sorted(self.acknowledged.items())
        )
        result = subprocess.run(
            ["qemu-io", "-r", "-U", "-f", fmt, target],
            input=commands + "quit\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        failed = re.findall(r"Pattern verification failed at offset (\d+)", result.stdout)
        bad = {int(at) // self.block * self.block for at in failed}
        done = result.stdout.count(f"read {self.block}/{self.block} bytes")
        if not bad and (result.returncode != 0 or done != len(self.acknowledged)):
            return sorted(self.acknowledged)  # qemu-io did not read them all: none is proven
        return sorted(bad)

    def _write(self) -> None:
        stdin, stdout = self._process.stdin, self._process.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("qemu-io was started without pipes")
        blocks = self.length // self.block
        try:
            while not self._stopping.is_set():
                n = self.count
                offset = self.start + n % blocks * self.block
                pattern = 1 + (n // blocks + n % blocks) % 255  # never 0, new on each pass
                stdin.write(f"write -P {pattern:#04x} {offset} {self.block}\n")
                stdin.flush()
                line = stdout.readline()
                wrote = _WROTE.search(line)
                if wrote is None or wrote.group(1) != wrote.group(2):
                    self.error = line.strip() or "qemu-io ended"
                    return
                stdout.readline()  # qemu-io's timing line
                self.acknowledged[offset] = pattern
                self.count += 1
                self._stopping.wait(0.002)  # a guest that also thinks between writes
        except (OSError, ValueError) as e:
            self.error = str(e)
