"""Running one QEMU tool to completion: progress as it prints it, a timeout, and cancellation.

Kept apart from the adapter (engine/formats/qemu/image_tools.py), which decides what to run:
this module only knows how a run is watched and how it fails.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from engine.errors import QemuCancelled, QemuError, QemuTimeout

Progress = Callable[[float], None]
# How often a running tool's ``cancel`` event is looked at: a stage that prints no progress
# (create, resize, a rebase of an image with nothing to copy) must still stop soon.
CANCEL_CHECK_SECONDS = 0.2

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_STDERR_TAIL = 2000


def execute(
    args: Sequence[str],
    timeout: float | None,
    progress: Progress | None,
    cancel: threading.Event | None = None,
) -> tuple[int, bytes, bytes]:
    """Run to completion, reading stdout as it comes so progress is reported while it runs.

    Standard error goes to a file so that a chatty tool can never fill a pipe and stall. If
    ``progress`` raises, the tool is killed and the exception propagates: that is how a caller
    stops a long copy. Setting ``cancel`` kills it too (within CANCEL_CHECK_SECONDS), with
    :class:`QemuCancelled`: that is how a caller stops a tool that prints nothing.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    reporter = _ProgressReporter(progress)
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        except OSError as e:
            raise QemuError(command=shlex.join(args), returncode=None, stderr=str(e)) from e
        assert proc.stdout is not None  # for the type checker: PIPE was asked for
        out = bytearray()
        try:
            with proc.stdout, selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    if cancel is not None and cancel.is_set():
                        raise QemuCancelled(command=shlex.join(args))
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise subprocess.TimeoutExpired(args, timeout or 0)
                    if cancel is not None:
                        left = min(CANCEL_CHECK_SECONDS, left or CANCEL_CHECK_SECONDS)
                    if not selector.select(left):
                        continue
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out += chunk
                    reporter.feed(chunk)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            code = proc.wait(left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise QemuTimeout(command=shlex.join(args), timeout=timeout or 0) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if code == 0:
            reporter.finish()
        err.seek(0)
        return code, bytes(out), err.read()


class _ProgressReporter:
    """Turns qemu-img's ``    (12.34/100%)\\r`` output into calls with rising percentages."""

    def __init__(self, callback: Progress | None) -> None:
        self.callback = callback
        self.pending = b""
        self.last = -1.0

    def feed(self, chunk: bytes) -> None:
        if self.callback is None:
            return
        *lines, self.pending = (self.pending + chunk).split(b"\r")
        for line in lines:
            self._report(line)

    def finish(self) -> None:
        if self.callback is None:
            return
        self._report(self.pending)
        if self.last < 100.0:  # success is complete even if the last print was throttled away
            self._report(b"(100/100%)")

    def _report(self, line: bytes) -> None:
        match = _PROGRESS.search(line)
        if match is not None and self.callback is not None:
            percent = min(float(match.group(1)), 100.0)
            if percent > self.last:
                self.last = percent
                self.callback(percent)


def failure(args: Sequence[str], code: int, err: bytes) -> QemuError:
    tail = err.decode(errors="replace").strip()[-_STDERR_TAIL:]
    return QemuError(command=shlex.join(args), returncode=code, stderr=tail)
