"""Operations and stages: the work an image needs, as plain data the log can hold forever.

An operation is ``{"op_id", "purpose", "stages": [...]}``; a stage is a dict whose ``"do"`` names
the data work an executor performs (docs/adr/0004-images-volumes-operations-and-stages.md):

``create``  make volume ``volume`` (``size``; qcow2 overlay on ``backing`` if given; raw
            preallocated if ``preallocate``)
``copy``    copy the content of image ``source_image`` (its whole chain) into a new standalone
            ``volume`` (``preallocate`` for raw)
``diff``    make qcow2 ``volume`` holding only what ``source_image`` has that differs from
            volume ``base`` (an incremental copy)
``rebase``  fold the data of ``volume``'s backing (``old_backing``; without it, whatever its
            header names) into it and point it at ``backing``
``resize``  grow ``volume`` to ``size``
``delete``  remove the files ``volumes``

``set_chain``, when present, is the image's chain once the stage has completed; ``drop_volume``
(a merge) instead removes that volume from the chain as it is at completion. Stages are
values: keys are only ever added, so old logs keep their meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

VIRTUAL_DISK = "virtual-disk"
SNAPSHOT = "snapshot"
KINDS = (VIRTUAL_DISK, SNAPSHOT)

SPACE = "space"
PERFORMANCE = "performance"
STRATEGIES = (SPACE, PERFORMANCE)

CLEAN, OPTIMIZE, MERGE, MEND = "clean", "optimize", "merge", "mend"
FIX_TYPES = (CLEAN, OPTIMIZE, MERGE, MEND)

# Operation states.
PENDING = "pending"  # runs when its turn comes
HELD = "held"  # planned with auto_fix=False: waits for a fix to release it
DONE = "done"
FAILED = "failed"  # a stage failed; a mend fix re-runs it
STOPPED = "stopped"  # stop_fix; a mend fix resumes it

_VOLUME = re.compile(r"[0-9a-f]{32}\.(raw|qcow2)")

Stage = dict[str, Any]


def volume_ref(volume_id: str, fmt: str) -> str:
    """A volume as chains name it: its file name, ``<32 hex>.<format>``."""
    return f"{volume_id}.{fmt}"


def split_ref(ref: str) -> tuple[str, str]:
    if not _VOLUME.fullmatch(ref):
        raise ValueError(f"not a volume reference: {ref!r}")
    volume_id, _, fmt = ref.partition(".")
    return volume_id, fmt


def produced_by(stage: Stage) -> str | None:
    """The volume a stage makes, if any."""
    if stage["do"] in ("create", "copy", "diff"):
        volume: str = stage["volume"]
        return volume
    return None


@dataclass
class Operation:
    """One operation of an image, as the events so far have shaped it."""

    op_id: str
    purpose: str
    stages: list[Stage]
    state: str = PENDING
    done: int = 0  # stages completed
    claim_host: str | None = None
    claim_epoch: int = 0  # bumped by every claim of any stage of this operation
    percent: int = -1
    error: str | None = None
    history: list[str] = field(default_factory=list)

    @classmethod
    def from_plan(cls, plan: dict[str, Any], *, held: bool = False) -> Operation:
        return cls(
            op_id=plan["op_id"],
            purpose=plan["purpose"],
            stages=[dict(s) for s in plan["stages"]],
            state=HELD if held or plan.get("held") else PENDING,
        )

    @property
    def finished(self) -> bool:
        return self.state == DONE

    @property
    def current_stage(self) -> Stage | None:
        return self.stages[self.done] if self.done < len(self.stages) else None

    def stage_label(self) -> str:
        """``X/Y``: the stage now running or next to run, or the last one when all are done."""
        total = len(self.stages)
        return f"{min(self.done + 1, total)}/{total}" if total else "0/0"


def plan(op_id: str, purpose: str, *stages: Stage) -> dict[str, Any]:
    return {"op_id": op_id, "purpose": purpose, "stages": list(stages)}
