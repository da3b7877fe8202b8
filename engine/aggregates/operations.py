"""Operations: the work an image needs, as plain data the log can hold forever.

An operation is stored as ``{"op_id", "purpose", "stages": [...]}`` (:class:`OperationPlan`);
a stage is a map whose ``"do"`` names the data work an executor performs. Each kind of stage,
its typed form and the volumes it makes and reads are declared in
engine/aggregates/stage_kinds.py (docs/adr/0004-images-volumes-operations-and-stages.md,
docs/adr/0021-typed-stages-and-enums.md). Stages are values: keys are only ever added, so old
logs keep their meaning.

Purposes and states are ``StrEnum``s: a member is its string, so it compares equal to what the
log holds and is written as that string (engine/persistence/transcoder.py); a purpose read
back from the log is the plain string, and is kept as written (a newer Strata's too).

Imports: the aggregates' stage kinds and the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NotRequired, TypedDict

from engine.aggregates.stage_kinds import Stage as Stage
from engine.aggregates.stage_kinds import produced_by as produced_by

VIRTUAL_DISK = "virtual-disk"
SNAPSHOT = "snapshot"
KINDS = (VIRTUAL_DISK, SNAPSHOT)

SPACE = "space"
PERFORMANCE = "performance"
STRATEGIES = (SPACE, PERFORMANCE)


class Purpose(StrEnum):
    """Why an operation runs: the call that planned it, or the fix it is."""

    CREATE = "create"
    SNAPSHOT = "snapshot"
    COPY = "copy"
    RESIZE = "resize"
    CLEAN = "clean"  # free space
    OPTIMIZE = "optimize"  # a better representation
    MERGE = "merge"  # fold a removed snapshot's volume into the chains that read it
    MEND = "mend"  # repair a broken image
    PULL = "pull"  # a block job: fold backing volumes into the top (block_pull)
    COMMIT = "commit"  # a block job: write volumes down into a base (block_commit)
    # Live storage migration (architecture §8, docs/adr/0029): the whole flow, and the
    # operations of its granular verbs.
    MIGRATE = "migrate"  # migrate_image
    CLONE = "clone"  # clone_image_structure
    SYNC = "sync"  # sync_image_data
    REPLICATE = "replicate"  # disk_replicate_start
    SWITCH = "switch"  # disk_replicate_finish
    VERIFY = "verify"  # a deep check of the repository, on a new carrier (docs/adr/0033)


class OpState(StrEnum):
    """Where an operation is, as the events so far have shaped it (never stored as such)."""

    PENDING = "pending"  # runs when its turn comes
    HELD = "held"  # planned with auto_fix=False: waits for a fix to release it
    DONE = "done"
    FAILED = "failed"  # a stage failed; a mend fix re-runs it
    STOPPED = "stopped"  # stop_fix; a mend fix resumes it


# The members under the names the rest of the engine reads them by (module attributes are
# quicker to reach than an enum's in the folds' loops).
CLEAN, OPTIMIZE, MERGE, MEND = Purpose.CLEAN, Purpose.OPTIMIZE, Purpose.MERGE, Purpose.MEND
FIX_TYPES = (CLEAN, OPTIMIZE, MERGE, MEND)
PENDING, HELD, DONE = OpState.PENDING, OpState.HELD, OpState.DONE
FAILED, STOPPED = OpState.FAILED, OpState.STOPPED
BLOCK_JOBS = (Purpose.PULL, Purpose.COMMIT)  # operations the block-job calls report on
# Operations that run while a replication is on (a migration's own work).
MIGRATION = (Purpose.MIGRATE, Purpose.CLONE, Purpose.SYNC, Purpose.REPLICATE, Purpose.SWITCH)

_VOLUME = re.compile(r"[0-9a-f]{32}\.(raw|qcow2)")


class OperationPlan(TypedDict):
    """An operation as events carry it."""

    op_id: str
    purpose: str  # a Purpose
    stages: list[Stage]
    held: NotRequired[bool]  # planned with auto_fix=False


def volume_ref(volume_id: str, fmt: str) -> str:
    """A volume as chains name it: its file name, ``<32 hex>.<format>``."""
    return f"{volume_id}.{fmt}"


def split_ref(ref: str) -> tuple[str, str]:
    if not _VOLUME.fullmatch(ref):
        raise ValueError(f"not a volume reference: {ref!r}")
    volume_id, _, fmt = ref.partition(".")
    return volume_id, fmt


@dataclass(frozen=True)
class Checkpoint:
    """Where a copy's data is durable: in the temporary file of the attempt at ``epoch``, up
    to ``offset``; ``chunks``: the digests of the chunks before it (docs/adr/0032)."""

    epoch: int
    offset: int
    chunks: bytes


@dataclass
class Operation:
    """One operation of an image, as the events so far have shaped it."""

    op_id: str
    purpose: str  # a Purpose, or a newer Strata's purpose, as the log holds it
    stages: list[Stage]
    state: OpState = PENDING
    done: int = 0  # stages completed
    claim_host: str | None = None
    claim_epoch: int = 0  # bumped by every claim of any stage of this operation
    percent: int = -1
    error: str | None = None
    history: list[str] = field(default_factory=list)
    # How far a live stage got, as recorded before each step it takes (StageReached): what a
    # host finishing it after a crash decides by (docs/adr/0028). Cleared when a stage ends.
    phase: str = ""
    aborted: bool = False  # ended by abort_block_job: done, with nothing changed
    # The last checkpoint of a copy (StageCheckpointed, docs/adr/0032): the stage and the
    # claim epoch that recorded it, how far its data is durable, and the digests of the
    # chunks before that offset. Cleared when a stage completes.
    checkpoint_stage: int = -1
    checkpoint_epoch: int = 0
    checkpoint_offset: int = 0
    checkpoint_chunks: bytes = b""

    @classmethod
    def from_plan(cls, plan: OperationPlan, *, held: bool = False) -> Operation:
        return cls(
            op_id=plan["op_id"],
            purpose=plan["purpose"],
            stages=[s.copy() for s in plan["stages"]],
            state=HELD if held or plan.get("held") else PENDING,
        )

    @property
    def finished(self) -> bool:
        return self.state == DONE

    @property
    def current_stage(self) -> Stage | None:
        return self.stages[self.done] if self.done < len(self.stages) else None

    def checkpoint(self, stage: int) -> Checkpoint | None:
        """The last checkpoint recorded for ``stage``, if it is the current one."""
        if self.checkpoint_stage != stage or stage != self.done:
            return None
        return Checkpoint(self.checkpoint_epoch, self.checkpoint_offset, self.checkpoint_chunks)

    def stage_label(self) -> str:
        """``X/Y``: the stage now running or next to run, or the last one when all are done."""
        total = len(self.stages)
        return f"{min(self.done + 1, total)}/{total}" if total else "0/0"


def plan(op_id: str, purpose: str, *stages: Stage) -> OperationPlan:
    """An operation to queue; ``purpose`` is a :class:`Purpose` (or a string a test makes)."""
    return {"op_id": op_id, "purpose": purpose, "stages": list(stages)}
