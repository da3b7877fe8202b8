"""Named places where a test can make this process die as a fenced host would: ``kill -9``.

Recovery is only as good as the crash points it was tried at (SPEC §7). Executors call
``crashpoints("stage.before-publish")`` at each durable step of a stage; that does nothing unless
the wiring armed exactly that name, in which case the process sends itself SIGKILL there: no
``finally``, no flush, no atexit. The switch is read once, at wiring
(:meth:`CrashPoints.from_environ`), never deep inside the code that runs the stage.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping

from engine.errors import InvalidParameter

ENVIRONMENT_SWITCH = "STRATA_CRASH_AT"

AFTER_CLAIM = "stage.after-claim"  # StageClaimed is durable, nothing else happened
BEFORE_DATA = "stage.before-data"  # inputs resolved, no file touched yet
MID_COPY = "stage.mid-copy"  # qemu-img is copying into the temporary file (first progress)
BEFORE_PUBLISH = "stage.before-publish"  # the temporary file is complete
AFTER_PUBLISH = "stage.after-publish"  # the volume is published, StageCompleted is not
AFTER_COMPLETION = "stage.after-completion"  # StageCompleted is durable

NAMES = (AFTER_CLAIM, BEFORE_DATA, MID_COPY, BEFORE_PUBLISH, AFTER_PUBLISH, AFTER_COMPLETION)


def _kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashPoints:
    """Crash points of one process; disarmed unless given the name of one of :data:`NAMES`."""

    def __init__(
        self, armed: str | None = None, *, crash: Callable[[], None] = _kill_this_process
    ) -> None:
        if armed is not None and armed not in NAMES:
            raise InvalidParameter(
                f"one of {', '.join(NAMES)}, not {armed!r}", name=ENVIRONMENT_SWITCH
            )
        self.armed = armed
        self._crash = crash

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> CrashPoints:
        """Armed by ``STRATA_CRASH_AT=<name>`` in ``environ``; for test harnesses only."""
        return cls(environ.get(ENVIRONMENT_SWITCH) or None)

    def __call__(self, name: str) -> None:
        if name == self.armed:
            self._crash()


DISARMED = CrashPoints()
