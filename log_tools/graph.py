"""``strata-log graph``: the volume chains as a Graphviz graph, images labelled with status.

A box per volume, an arrow from each overlay to its backing volume, and an ellipse per image,
coloured by status, pointing at the top of its chain. Volumes a stage has yet to make are
dashed; removed images are drawn (grey, dashed) while a volume of theirs still exists.
Text DOT needs nothing; SVG and PNG run Graphviz's ``dot``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import uuid
from typing import Any

from engine.aggregates import operations as ops
from engine.errors import InvalidParameter
from engine.projections.replay import Replay, log_volume_files
from log_tools.replay import UNTIL_HELP, point_line, replay_at

FORMATS = ("dot", "svg", "png")
COLOURS = {"optimized": "palegreen", "degraded": "gold", "broken": "salmon", "removed": "grey90"}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "graph",
        help="draw the volume chains (Graphviz DOT, SVG or PNG)",
        description="The volume chains at a point in the log as a Graphviz graph: volumes, "
        "their backing volumes, and the images on top, labelled with their status. SVG and "
        "PNG need Graphviz's dot program.",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("--until", metavar="SEQ|ISO-TIME", help=UNTIL_HELP)
    command.add_argument("--format", choices=FORMATS, default="dot", help="default: dot")
    command.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    command.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise InvalidParameter(f"{parent} is not a directory", name="--output")
    dot_program = None if args.format == "dot" else find_dot()
    _, state = replay_at(args.path, args.until)
    text = to_dot(state)
    data = text.encode() if dot_program is None else render(dot_program, text, args.format)
    if args.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with open(args.output, "wb") as f:
            f.write(data)
    return 0


def find_dot() -> str:
    found = shutil.which("dot")
    if found is None:
        raise InvalidParameter(
            "SVG and PNG need Graphviz's dot program, which is not installed here (Debian: "
            "apt-get install graphviz); --format dot writes the graph as text",
            name="--format",
        )
    return found


def render(dot_program: str, text: str, fmt: str) -> bytes:
    # The one place the tools run another program; the DOT text is ours, so a failure is a bug.
    done = subprocess.run(
        [dot_program, f"-T{fmt}"], input=text.encode(), capture_output=True, check=True, timeout=60
    )
    return done.stdout


def to_dot(state: Replay) -> str:
    view = state.view
    existing = {f"{f.volume_id}.{f.fmt}" for f in log_volume_files(view)}
    lines = [
        "digraph strata {",
        f"  label={quote('volume chains ' + point_line(state))};",
        '  labelloc="t"; rankdir="BT";',
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    volumes: dict[str, bool] = {}  # ref -> exists
    edges: set[tuple[str, str]] = set()
    for row in state.statuses():
        chain = row["chain"]
        if not chain or (row["removed"] and not any(ref in existing for ref in chain)):
            continue
        for ref in chain:
            volumes[ref] = ref in existing
        edges.update(zip(chain[1:], chain[:-1], strict=True))  # overlay -> backing
        lines.append(f"  {quote('image:' + row['image_id'])} [{image_attributes(row)}];")
        lines.append(f"  {quote('image:' + row['image_id'])} -> {quote(chain[-1])} [style=dotted];")
    for ref, exists in sorted(volumes.items()):
        volume_id, fmt = ops.split_ref(ref)
        style = "" if exists else ', style="dashed"'
        label = f"{volume_id[:8]}… {fmt}" + ("" if exists else "\n(not made yet)")
        lines.append(f"  {quote(ref)} [shape=box, label={quote(label)}{style}];")
    for child, parent in sorted(edges):
        lines.append(f"  {quote(child)} -> {quote(parent)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def image_attributes(row: dict[str, Any]) -> str:
    name = row["user_data"].get("name") if isinstance(row["user_data"], dict) else None
    title = f"{row['kind']} {name}" if isinstance(name, str) else row["kind"]
    short_id = str(uuid.UUID(row["image_id"]))[:8]
    label = f"{title}\n{short_id}\n{row['status']} {row['stage']}"
    colour = COLOURS.get(row["status"], "white")
    style = '"filled,dashed"' if row["removed"] else "filled"
    return f"shape=ellipse, style={style}, fillcolor={colour}, label={quote(label)}"


def quote(text: str) -> str:
    """A DOT string; the text comes from the log, so nothing in it may end the string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
