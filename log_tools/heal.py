"""How ``strata-log history`` says what self-healing data left in the log: a copy's checkpoints
(docs/adr/0032), a volume's digest (0031), rot a deep check found (0033), and a mend, from its
request to its last stage (0034). One sentence per event.

A ``StageCompleted`` names only its operation's id: which operation it is (a mend?) and how many
stages it has comes from the plans the image's earlier events queued, which
:class:`Operations` remembers as the history is written, in order.

Imports: its own package (:mod:`log_tools.render`); the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from log_tools.render import printable

_MiB = 2**20
_GiB = 2**30
DIGEST_SHOWN = 12  # hex digits of a digest shown
# A fix's sentence names volumes, images and a repository's root: it may take more room.
WIDTH = 480


class Operations:
    """The plans the image's events queued so far, by operation id."""

    def __init__(self) -> None:
        self._plans: dict[str, dict[str, Any]] = {}

    def remember(self, event: str, fields: dict[str, Any]) -> None:
        plans: list[Any] = []
        if event in ("FixRequested", "OperationRequested", "ImageResized"):
            plans = [fields.get("operation")]
        elif event in ("ImageRequested", "SnapshotTaken", "ReplicaSwitched"):
            found = fields.get("operations")
            plans = found if isinstance(found, list) else []
        for plan in plans:
            if isinstance(plan, dict) and isinstance(plan.get("op_id"), str):
                self._plans[plan["op_id"]] = plan

    def get(self, op_id: object) -> dict[str, Any] | None:
        return self._plans.get(op_id) if isinstance(op_id, str) else None


def describe(event: str, fields: dict[str, Any], host: str, operations: Operations) -> str | None:
    """A sentence for one of the events above; None for any other (shown as its fields)."""
    text = _text(fields)
    if event == "StageCheckpointed":
        stage = fields.get("stage")
        number = stage + 1 if isinstance(stage, int) else "?"
        done = fields.get("offset")
        copied = size_text(done) if isinstance(done, int) else "?"
        return f"checkpoint of stage {number}: {copied} copied ({text('percent')}%)"
    if event == "VolumeDigested":
        return _digested(fields)
    if event == "DamageFound":
        ranges = _ranges(fields.get("ranges"))
        if not ranges:
            return f"damage found in volume {text('volume')}: {text('detail')}"
        return f"rot found in volume {text('volume')} at bytes {ranges}: {text('detail')}"
    if event == "FixRequested":
        return _fix(fields, host)
    if event == "StageCompleted":
        return _completed(fields, operations)
    return None


def _digested(fields: dict[str, Any]) -> str:
    text = _text(fields)
    digest = text("digest")
    shown = f"{digest[:DIGEST_SHOWN]}…" if len(digest) > DIGEST_SHOWN else digest
    chunks, chunk_size = fields.get("chunks"), fields.get("chunk_size")
    count: object = "?"
    if isinstance(chunks, bytes | str):
        count = len(chunks) // (32 if isinstance(chunks, bytes) else 64)
    size = f"{size_text(chunk_size)}" if isinstance(chunk_size, int) else "?"
    return f"digest of volume {text('volume')}: sha256 {shown} over {count} chunks of {size}"


def _fix(fields: dict[str, Any], host: str) -> str:
    text = _text(fields)
    kind = text("fix_type")
    plan = fields.get("operation")
    if not isinstance(plan, dict):
        return f"{kind} requested by {host}: resume operation {text('op_id')}"
    stages = plan.get("stages")
    said = "; ".join(stage_words(s) for s in stages) if isinstance(stages, list) else "no stages"
    return f"{kind} {text('op_id')} requested by {host}: {said}"


def _completed(fields: dict[str, Any], operations: Operations) -> str | None:
    """A mend's stages as they complete; other operations' completions are shown as fields."""
    plan = operations.get(fields.get("op_id"))
    stage = fields.get("stage")
    if plan is None or plan.get("purpose") != "mend" or not isinstance(stage, int):
        return None
    stages = plan.get("stages")
    total = len(stages) if isinstance(stages, list) else 0
    said = f"stage {stage + 1}/{total or '?'} of mend {printable(str(plan.get('op_id')))} completed"
    if isinstance(stages, list) and 0 <= stage < total:
        said += f" ({stage_words(stages[stage])})"
    if stage + 1 == total:
        said += ": the mend is done"
    return said


def stage_words(stage: Any) -> str:
    """A fix's stage as words: what it makes, from what."""
    if not isinstance(stage, dict):
        return "?"
    text = _text(stage)
    kind = text("do")
    where = f" in {text('source_root')}" if stage.get("source_root") else ""
    if kind == "delete":
        volumes = stage.get("volumes")
        named = ", ".join(map(str, volumes)) if isinstance(volumes, list) else "?"
        said = f"delete {printable(named) or 'nothing'}"
        temporaries = stage.get("temporaries")
        if isinstance(temporaries, list) and temporaries:
            said += f" and {len(temporaries)} temporary file(s)"
        return said
    if kind == "copy":
        return f"copy image {text('source_image')}{where} into {text('volume')}"
    if kind == "diff":
        return f"make {text('volume')} over {text('base')} from image {text('source_image')}{where}"
    if kind == "create":
        over = f" over {text('backing')}" if stage.get("backing") else ""
        return f"create {text('volume')} empty{over}"
    if kind == "digest":
        return f"record the digest of {text('volume')}"
    return f"{kind} {text('volume')}".strip()


def size_text(n: int) -> str:
    """Bytes as people read them: 1.5 GiB, 64 MiB, 512 bytes."""
    for unit, name in ((_GiB, "GiB"), (_MiB, "MiB"), (1024, "KiB")):
        if n >= unit:
            value = n / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{n} bytes"


def _ranges(value: object) -> str:
    if not isinstance(value, list):
        return ""
    said = []
    for r in value[:4]:
        if isinstance(r, list | tuple) and len(r) == 2:
            said.append(f"{r[0]}-{r[1]}")
    more = f" and {len(value) - 4} more" if len(value) > 4 else ""
    return ", ".join(said) + more


def _text(fields: dict[str, Any]) -> Callable[[str], str]:
    def text(key: str) -> str:
        value = fields.get(key)
        return "" if value is None else printable(str(value))

    return text
