"""Named places where a test can make this process die as a fenced host would: ``kill -9``.

Recovery is only as good as the crash points it was tried at (architecture §5). Executors call
``crashpoints("stage.before-publish")`` at each durable step of a stage and around each append
they make; that does nothing unless the wiring armed exactly that name, in which case the process
sends itself SIGKILL there: no ``finally``, no flush, no atexit. ``name@N`` arms the N-th time
the point is reached in the process (the second stage of an operation, say). The switch is read
once, at wiring (:meth:`CrashPoints.from_environ`), never deep inside the code that runs the
stage.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable, Mapping

from engine.errors import InvalidParameter

ENVIRONMENT_SWITCH = "STRATA_CRASH_AT"

BEFORE_CLAIM = "claim.before-append"  # a stage was chosen to run; StageClaimed is not appended
AFTER_CLAIM = "stage.after-claim"  # StageClaimed is durable, nothing else happened
BEFORE_DATA = "stage.before-data"  # inputs resolved, no file touched yet
# A copy's progress is its checkpoints (docs/adr/0032): these two are also passed around each
# StageCheckpointed, so that ``progress.after-append@N`` dies right after the N-th checkpoint.
BEFORE_PROGRESS = "progress.before-append"  # the data work reported progress, not yet saved
AFTER_PROGRESS = "progress.after-append"  # StageProgressed is durable, the work goes on
MID_COPY = "stage.mid-copy"  # a copy is writing into the temporary file (first block)
MID_REBASE = "stage.mid-rebase"  # a diff or a merge (qemu-img rebase) is writing clusters
MID_DELETE = "stage.mid-delete"  # a delete removed its first file
BEFORE_PUBLISH = "stage.before-publish"  # the temporary file is complete
AFTER_PUBLISH = "stage.after-publish"  # the volume is published (linked, temporary name gone)
AFTER_DATA = "stage.after-data"  # all data work is done; StageCompleted is not appended
AFTER_COMPLETION = "stage.after-completion"  # StageCompleted is durable

# The points a stage that produces a volume (create, copy, diff) passes, in order.
NAMES = (AFTER_CLAIM, BEFORE_DATA, MID_COPY, BEFORE_PUBLISH, AFTER_PUBLISH, AFTER_COMPLETION)
# Around the other appends, and inside the other stage kinds.
MORE_NAMES = (
    BEFORE_CLAIM,
    BEFORE_PROGRESS,
    AFTER_PROGRESS,
    MID_REBASE,
    MID_DELETE,
    AFTER_DATA,
)
ALL_NAMES = NAMES + MORE_NAMES

# A live storage migration's states (engine/executors/migration_stages.py, docs/adr/0029), in
# the order an attached image's migration passes them; tried by tests/live/
# test_migration_recovery.py with the engine alone killed and with its daemon.
MIGRATION_AFTER_CLONE = "migration.after-clone"  # the chain is made, empty, in the destination
MIGRATION_MID_SYNC = "migration.mid-sync"  # a volume below the top is being copied
MIGRATION_AFTER_SYNC = "migration.after-sync"  # every volume below the top is in place
MIGRATION_MIRRORING = "migration.after-mirroring"  # "mirroring" is recorded, the job started
MIGRATION_BEFORE_COMPLETE = "migration.before-job-complete"  # "switch requested" is recorded
MIGRATION_AFTER_COMPLETE = "migration.after-job-complete"  # job-complete was asked for
MIGRATION_BEFORE_SWITCHED = "migration.before-switched"  # QEMU switched; no ReplicaSwitched
MIGRATION_AFTER_SWITCHED = "migration.after-switched"  # ReplicaSwitched is durable
MIGRATION_NAMES = (
    MIGRATION_AFTER_CLONE,
    MIGRATION_MID_SYNC,
    MIGRATION_AFTER_SYNC,
    MIGRATION_MIRRORING,
    MIGRATION_BEFORE_COMPLETE,
    MIGRATION_AFTER_COMPLETE,
    MIGRATION_BEFORE_SWITCHED,
    MIGRATION_AFTER_SWITCHED,
)
# Reached only in seed 003's granular order (disk_replicate_start before the sync): the switch
# cancelled the mirror whose target was opened alone; the new one is not started yet. Tried by
# tests/live/test_migration_recovery_more.py.
MIGRATION_AFTER_CANCEL = "migration.after-cancel"
MIGRATION_GRANULAR_NAMES = (MIGRATION_AFTER_CANCEL,)
ARMABLE = ALL_NAMES + MIGRATION_NAMES + MIGRATION_GRANULAR_NAMES

_ARMED = re.compile(r"(?P<name>[a-z.-]+)(?:@(?P<occurrence>[1-9][0-9]{0,3}))?")


def _kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashPoints:
    """Crash points of one process; disarmed unless given ``name`` or ``name@N`` of one of
    :data:`ARMABLE`."""

    def __init__(
        self, armed: str | None = None, *, crash: Callable[[], None] = _kill_this_process
    ) -> None:
        self.armed: str | None = None
        self.occurrence = 1
        if armed is not None:
            match = _ARMED.fullmatch(armed) if isinstance(armed, str) else None
            if match is None or match["name"] not in ARMABLE:
                raise InvalidParameter(
                    f"one of {', '.join(ARMABLE)} (optionally @N), not {armed!r}",
                    name=ENVIRONMENT_SWITCH,
                )
            self.armed = match["name"]
            self.occurrence = int(match["occurrence"] or 1)
        self._crash = crash
        self._reached = 0
        self._mutex = threading.Lock()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> CrashPoints:
        """Armed by ``STRATA_CRASH_AT=<name>[@N]`` in ``environ``; for test harnesses only."""
        return cls(environ.get(ENVIRONMENT_SWITCH) or None)

    def __call__(self, name: str) -> None:
        if name != self.armed:
            return
        with self._mutex:
            self._reached += 1
            now = self._reached == self.occurrence
        if now:
            self._crash()


DISARMED = CrashPoints()
