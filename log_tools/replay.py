"""``strata-log replay``: the repository as the log says it was at a point, and what a check
would have offered then.

The state comes from :mod:`engine.projections.point_in_time` (the engine's own view, status and fix
rules over a read-only log). Fixes are the log's alone: see :data:`FIXES_BASIS`.

Imports: its own package, ``engine.projections``, ``engine.types``; the standard library.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from engine.projections.point_in_time import Replay, replay
from engine.types import Fix
from log_tools.paths import find_log_dir
from log_tools.points import parse_until
from log_tools.render import iso_time, printable, short, to_json

FIXES_BASIS = (
    "from the log alone: the volume files are taken to be what completed stages made and did "
    "not delete; leftovers of crashed stages, missing or damaged volumes and byte counts need "
    "the files (check_storage_repository on the repository)"
)
UNTIL_HELP = (
    "a sequence number, or an ISO 8601 time (UTC unless it names a zone); the state after the "
    "last whole transaction at or before it (default: the end of the log)"
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "replay",
        help="the state of every image at a point in the log, and the fixes offered then",
        description="Fold the log up to a point and show every image (kind, size, status, "
        "stage, host) and the fixes a check would have offered then, " + FIXES_BASIS + ". "
        "Reading stops at the point: damage after it is not seen (use verify).",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("--until", metavar="SEQ|ISO-TIME", help=UNTIL_HELP)
    command.add_argument("--json", action="store_true", help="one JSON object instead of text")
    command.set_defaults(command=run)


def replay_at(path: str, until: str | None) -> tuple[str, Replay]:
    """The log directory of ``path`` and its state at ``until`` (text, as given)."""
    log_dir = find_log_dir(path)
    point = None if until is None else parse_until(until, time.time_ns())
    return log_dir, replay(log_dir, point)


def run(args: argparse.Namespace) -> int:
    log_dir, state = replay_at(args.path, args.until)
    if args.json:
        print(to_json(to_dict(log_dir, state)))
    else:
        write_text(log_dir, state, sys.stdout)
    return 0


def fix_dict(fix: Fix) -> dict[str, Any]:
    return {
        "type": fix.type,
        "image_ids": list(fix.image_ids),
        "description": without_byte_counts(fix.description),
        "data": fix.data,
    }


def without_byte_counts(description: str) -> str:
    # The rules count the bytes of the files they were given; here there were none.
    return description.replace(", 0 bytes", "").replace(" 0 bytes", "")


def to_dict(log_dir: str, state: Replay) -> dict[str, Any]:
    repository = state.view.repository
    return {
        "log_directory": log_dir,
        "position": state.position,
        "time": None if state.time_ns is None else iso_time(state.time_ns),
        "time_ns": state.time_ns,
        "log_ends_here": state.ended,
        "repository": None if repository is None else repository.to_dict(),
        "images": state.statuses(),
        "fixes": [fix_dict(f) for f in state.fixes()],
        "fixes_basis": FIXES_BASIS,
    }


def point_line(state: Replay) -> str:
    if state.position == 0:
        return "before the first record"
    when = "" if state.time_ns is None else f" ({iso_time(state.time_ns)})"
    rest = "the end of the log" if state.ended else "the log goes on"
    return f"after record {state.position}{when}; {rest}"


def write_text(log_dir: str, state: Replay, out: TextIO) -> None:
    repository = state.view.repository
    rows = state.statuses()
    live = [r for r in rows if not r["removed"]]
    out.write(f"log        {log_dir}\n")
    out.write(f"point      {point_line(state)}\n")
    if repository is not None:
        out.write(
            f"repository {repository.format_name}-{repository.format_version}, created by "
            f"{printable(repository.created_by)} on {repository.created_on}\n"
        )
    out.write(f"images     {len(live)} live, {len(rows) - len(live)} removed\n\n")
    out.write(image_table(rows))
    fixes = state.fixes()
    out.write(f"\nfixes a check would have offered then: {len(fixes)}\n")
    out.write(f"  ({FIXES_BASIS})\n")
    for fix in fixes:
        ids = ", ".join(fix.image_ids) or "(a new carrier)"
        out.write(f"  {fix.type:<8} {ids}\n           {without_byte_counts(fix.description)}\n")


def image_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'IMAGE':<36}  {'KIND':<12}  {'SIZE':>10}  {'STATUS':<9}  {'STAGE':<5}  {'%':>4}  "
        f"{'HOST':<12}  NAME / LAST ERROR"
    ]
    for row in rows:
        note = row["last_error"] or _name(row["user_data"])
        lines.append(
            f"{row['image_id']:<36}  {row['kind']:<12}  {row['size']:>10}  {row['status']:<9}  "
            f"{row['stage']:<5}  {row['percent_complete']:>4}  "
            f"{short(str(row['host_id']), 12):<12}  {short(note, 60)}"
        )
    return "\n".join(lines) + "\n"


def _name(user_data: Any) -> str:
    if isinstance(user_data, dict):
        for key in ("name", "label"):
            if isinstance(user_data.get(key), str):
                return str(user_data[key])
    return ""
