"""``strata-log history``: the life of one image, event by event.

Each event with its sequence number, time and host, its own fields (what it says happened), and
how the image looked after its transaction compared with the image's previous event: status,
stage, chain, size, the host it is attached on and so on, computed by the engine's own view over
the whole log up to there (an image's status also depends on the images whose volumes it uses).

The events of live work (docs/adr/0028-live-operations-as-stages.md), of a migration
(docs/adr/0029) and of self-healing data (checkpoints, digests, rot and mends:
:mod:`log_tools.heal`) are said as a sentence in the text form: their fields (a block job's
plan, above all) say little on one line. A migrated image's history also holds the events of
the other repositories' logs (:mod:`log_tools.migrations`).

Imports: its own package, ``engine.errors``, ``engine.log``, ``engine.projections``; the
standard library.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from engine.errors import ImageNotFound, InvalidParameter
from engine.log.framing import Record, key_of
from engine.projections.log_events import new_mapper, to_event
from engine.projections.point_in_time import image_summary, replay
from engine.projections.view import RepositoryView
from log_tools import heal
from log_tools.migrations import MIGRATED_TO, trace
from log_tools.paths import find_log_dir
from log_tools.render import event_fields, iso_time, printable, short, to_json

# How the image looked, compared between its events.
_WATCHED = (
    "status", "stage", "percent_complete", "host_id", "last_error", "size", "chain", "removed",
    "user_data", "attached_on",
)  # fmt: skip


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "history",
        help="every event of one image, with time, host and what changed",
        description="The life of one image: each of its events with sequence number, time, "
        "host and fields, and what changed in the image after it. A migrated image's events "
        "in the logs of the repositories it came from or went to come too, merged by time, "
        "each with its repository.",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("image_id", metavar="IMAGE_ID", help="the image's id (a UUID)")
    command.add_argument("--json", action="store_true", help="one JSON object per event")
    command.add_argument(
        "--this-log-only",
        action="store_true",
        help="only PATH's log, not the logs of the repositories the image migrated from or to",
    )
    command.set_defaults(command=run)


def history(log_dir: str, image_id: str) -> list[dict[str, Any]]:
    try:
        key = uuid.UUID(image_id)
    except ValueError:
        raise InvalidParameter(f"not an image id (a UUID): {image_id!r}", name="IMAGE_ID") from None
    mapper = new_mapper()
    entries: list[dict[str, Any]] = []
    before: dict[str, Any] = {}

    def seen(records: Sequence[Record], view: RepositoryView) -> None:
        nonlocal before
        image = view.image(key)
        after = {}
        if image is not None:  # and the host it is attached on, which the summary leaves out
            after = {**image_summary(image, view), "attached_on": image.attached_on}
        changed = {k: [before.get(k), after[k]] for k in _WATCHED if before.get(k) != after.get(k)}
        for record in records:
            if record.originator_key != key_of(key):
                continue
            event = to_event(mapper, record)
            fields = event_fields(event)
            entries.append(
                {
                    "seq": record.seq,
                    "time": iso_time(record.time_ns),
                    "time_ns": record.time_ns,
                    "host_id": record.host_id,
                    "version": record.originator_version,
                    "event": type(event).__name__,
                    "fields": fields,
                    "changed": changed,
                }
            )
            changed = {}  # said once per transaction, on the image's first event in it
        before = after

    replay(log_dir, watch=key, on_watched=seen)
    if not entries:
        raise ImageNotFound("in this log (it names no event of it)", image_id=image_id)
    return entries


def run(args: argparse.Namespace) -> int:
    if args.this_log_only:
        entries, notes = history(find_log_dir(args.path), args.image_id), []
    else:
        traced = trace(args.path, args.image_id, history)
        entries, notes = traced.entries, traced.notes
    if args.json:
        for entry in entries:
            print(to_json(entry, indent=None))
    else:
        write_text(entries, sys.stdout)
    if notes:
        sys.stdout.flush()  # the history first, then what it leaves out
        for note in notes:
            print(f"strata-log: note: {printable(note)}", file=sys.stderr)
    return 0


def write_text(entries: list[dict[str, Any]], out: TextIO) -> None:
    """One line per event (and one per change it made); each line starts with the repository
    when the entries come from more than one."""
    repositories = {entry.get("repository", "") for entry in entries}
    width = max(map(len, repositories)) if len(repositories) > 1 else 0
    operations = heal.Operations()  # which operation a StageCompleted completes (a mend?)
    for entry in entries:
        where = f"{printable(entry['repository']):<{width}}" if width else ""
        operations.remember(entry["event"], entry["fields"])
        sentence = describe(entry["event"], entry["fields"], entry["host_id"])
        room = 240  # names two volumes and an operation: longer
        if sentence is None:
            host = printable(entry["host_id"])
            sentence = heal.describe(entry["event"], entry["fields"], host, operations)
            room = heal.WIDTH
        if sentence is None:
            said = short(", ".join(f"{k}={_value(v)}" for k, v in entry["fields"].items()), 160)
        else:
            said = short(sentence, room)
        out.write(
            f"{where}{entry['seq']:>8}  {entry['time']}  {printable(entry['host_id'])}  "
            f"v{entry['version']}  {entry['event']}  {said}\n"
        )
        for name, (old, new) in entry["changed"].items():
            out.write(f"{'':>{width + 10}}{name}: {_value(old)} -> {_value(new)}\n")


def _value(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        # Operation plans: their purposes say enough here; --json has every stage.
        return "[" + ", ".join(str(v.get("purpose", "?")) for v in value) + "]"
    return short(repr(value) if isinstance(value, str) else str(value), 100)


def describe(event: str, fields: dict[str, Any], host_id: str) -> str | None:
    """A sentence for an event of live work or of use by a host (None for the others, shown
    as their fields); ``host_id`` appended it."""
    text = _text(fields)
    host = printable(host_id)
    if event == "ImagePrepared":
        return f"prepared on {host}, for a virtual machine that opens its file itself"
    if event == "ImageTornDown":
        return f"torn down on {host}: no longer prepared or attached there"
    if event == "ImageAttached":
        return f"attached on {host}: its storage daemon serves the image"
    if event == "AttachmentReleased":
        return f"attachment of {text('of_host')} released: {text('reason') or 'no reason given'}"
    if event == "OperationRequested":
        plan = fields.get("operation")
        if not isinstance(plan, dict):
            return None
        return _plan(plan, "requested")
    if event == "StageReached":
        stage = fields.get("stage")
        number = stage + 1 if isinstance(stage, int) else "?"
        return (
            f"stage {number} of operation {text('op_id')} reached {text('phase')!r} "
            f"(epoch {text('epoch')}), recorded before that step"
        )
    if event == "OperationAborted":
        return (
            f"operation {text('op_id')} aborted, the chain left as it was: "
            f"{text('reason') or 'no reason given'}"
        )
    return _migration_sentence(event, fields, host)


def _migration_sentence(event: str, fields: dict[str, Any], host: str) -> str | None:
    """A migration's events (docs/adr/0029), in the source's log and in the destination's."""
    text = _text(fields)
    if event == "ReplicationStarted":
        return f"replication to {text('target')} started"
    if event == "ReplicationEnded":
        outcome = fields.get("outcome")
        if outcome == "switched":
            return f"replication to {text('target')} ended: switched, the image lives there now"
        if outcome == "aborted":
            return f"replication to {text('target')} ended: aborted, the image stays here"
        return f"replication to {text('target')} ended: {text('outcome')}"
    if event == "ReplicaSwitched":
        said = (
            f"became the image here, in place of the one in {text('source')}; the source's copy "
            f"is removed next; "
        )
        if fields.get("attached") is True:
            said += f"attached on {host}: its daemon serves it through the same export"
        else:
            said += "not attached"
        plans = fields.get("operations")
        for plan in plans if isinstance(plans, list) else []:
            said += f"; {_plan(plan, 'queued')}" if isinstance(plan, dict) else ""
        return said
    if event in ("ImageRequested", "ReplicaRenewed"):
        origin = fields.get("origin")
        if not isinstance(origin, dict) or origin.get("how") != "replica":
            return None
        made = _text(origin)
        said = f"replica of the image in {made('of')}, made by migration {made('op')}"
        return (
            said
            if event == "ImageRequested"
            else f"{said}, over the image of this id removed here: it starts over"
        )
    if event == "ImageRemoved":
        reason = fields.get("reason")
        if isinstance(reason, str) and reason.startswith(MIGRATED_TO):
            return f"{text('reason')}: removed here, it lives there now"
    return None


def _plan(plan: dict[str, Any], done: str) -> str:
    """An operation's plan as words: its purpose, id, what was ``done`` with it, its stages."""
    stages = plan.get("stages")
    said = "; ".join(_stage(s) for s in stages) if isinstance(stages, list) else "no stages"
    return f"block job {_text(plan)('purpose')} {_text(plan)('op_id')} {done}: {said}"


def _stage(stage: Any) -> str:
    """One stage of a block job as words: what it writes where."""
    if not isinstance(stage, dict):
        return "?"
    text = _text(stage)
    kind = text("do")
    if kind == "commit":
        said = f"commit {text('top')} down into {text('volume')}"
        if stage.get("child"):
            said += f", then {text('child')} reads {text('volume')}"
        else:
            said += ", then the image pivots onto it"
    elif kind == "rebase":
        below = f"down to {text('backing')}" if stage.get("backing") else "all of it"
        said = f"pull the volumes below {text('volume')} into it, {below}"
    else:
        said = _migration_stage(kind, stage) or f"{kind} {text('volume')}"
    bandwidth = stage.get("bandwidth")
    if isinstance(bandwidth, int) and bandwidth:
        said += f" at {bandwidth} bytes/s"
    return said


def _migration_stage(kind: str, stage: dict[str, Any]) -> str | None:
    """A migration's stage as words (docs/adr/0029): what it makes or copies in the target."""
    text = _text(stage)
    volumes = stage.get("volumes")
    count = len(volumes) if isinstance(volumes, list) else "?"
    if kind == "clone":
        return f"clone the chain's {count} volume(s) empty into {text('target')}"
    if kind == "sync":
        return f"copy {count} immutable volume(s) into {text('target')}"
    if kind == "mirror":
        return f"mirror {text('volume')} into {text('target')}"
    if kind == "switch":
        said = f"switch to the replica in {text('target')}"
        merge = stage.get("merge")
        if isinstance(merge, list) and len(merge) == 2:
            base, top = (printable(str(ref)) for ref in merge)
            said += f", where {top} is then merged down into {base}"
        return said
    return None


def _text(fields: dict[str, Any]) -> Callable[[str], str]:
    """``text(key)``: the field as printable text, '' if absent (the log is read as it is)."""

    def text(key: str) -> str:
        value = fields.get(key)
        return "" if value is None else printable(str(value))

    return text
