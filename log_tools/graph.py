"""``strata-log graph``: the volume chains as a Graphviz graph, images labelled with status.

A box per volume, an arrow from each overlay to its backing volume, and an ellipse per image,
coloured by status, pointing at the top of its chain. Volumes a stage has yet to make are
dashed; removed images are drawn (grey, dashed) while a volume of theirs still exists.
Text DOT needs nothing and holds every node; SVG and PNG run Graphviz's ``dot``, under a time
limit, and show a graph of more than :data:`DRAWN_NODES` nodes summarised (log_tools.chains)
unless ``--full`` is given.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.projections``; the
standard library.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import uuid
from typing import Any

from engine.aggregates import operations as ops
from engine.errors import InvalidParameter, ToolFailed
from engine.projections.point_in_time import Replay
from log_tools import chains, output
from log_tools.chains import Summary, Tree
from log_tools.paths import seconds
from log_tools.replay import UNTIL_HELP, point_line, replay_at

FORMATS = ("dot", "svg", "png")
COLOURS = {"optimized": "palegreen", "degraded": "gold", "broken": "salmon", "removed": "grey90"}
DRAWN_NODES = 2000  # dot lays these out in about a second; 6,500 took half a minute
DOT_TIMEOUT = 60.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "graph",
        help="draw the volume chains (Graphviz DOT, SVG or PNG)",
        description="The volume chains at a point in the log as a Graphviz graph: volumes, "
        "their backing volumes, and the images on top, labelled with their status. SVG and "
        f"PNG need Graphviz's dot program; above {DRAWN_NODES} nodes they show the trees "
        "with an image that needs attention and count the others by shape (--full draws "
        "everything; --format dot always writes every node).",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("--until", metavar="SEQ|ISO-TIME", help=UNTIL_HELP)
    command.add_argument("--format", choices=FORMATS, default="dot", help="default: dot")
    command.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    command.add_argument(
        "--full", action="store_true", help=f"draw SVG or PNG in full above {DRAWN_NODES} nodes"
    )
    command.add_argument(
        "--timeout",
        type=seconds,
        default=DOT_TIMEOUT,
        metavar="S",
        help=f"stop Graphviz after S seconds (default: {DOT_TIMEOUT:g})",
    )
    command.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    target = None
    if args.output is not None:
        target = output.writable_target(
            args.path, args.output, name="--output", replace=True, devices=True
        )
    dot_program = None if args.format == "dot" else find_dot()
    _, state = replay_at(args.path, args.until)
    trees = chains.trees(state)
    nodes = sum(tree.nodes for tree in trees)
    if dot_program is None or args.full or nodes <= DRAWN_NODES:
        text = to_dot(state, trees)
    else:
        summary = chains.summarise(trees, DRAWN_NODES)
        text = summary_to_dot(state, summary)
        print(f"strata-log: note: {summary_note(summary)}", file=sys.stderr)
    data = text.encode() if dot_program is None else render(dot_program, text, args, nodes)
    if target is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        try:
            with output.replacing(target) as temporary, open(temporary, "wb") as f:
                f.write(data)
        except OSError as e:  # a write names no file: say which
            raise ToolFailed(f"writing {target} failed: {e.strerror or e}") from e
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


def render(dot_program: str, text: str, args: argparse.Namespace, nodes: int) -> bytes:
    # The one place the tools run another program: its time and its failures are bounded here.
    command = [dot_program, f"-T{args.format}"]
    try:
        done = subprocess.run(
            command, input=text.encode(), capture_output=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        raise ToolFailed(
            f"Graphviz's dot did not finish drawing {nodes} nodes in {args.timeout:g} s and was "
            f"stopped; give it longer (--timeout), leave out --full to draw a summary, or write "
            f"the graph as text (--format dot)"
        ) from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        reason = said[-1] if said else f"exit status {done.returncode}"
        raise ToolFailed(f"Graphviz's dot failed: {reason}; --format dot writes the graph as text")
    return done.stdout


def to_dot(state: Replay, trees: list[Tree]) -> str:
    lines = _preamble(f"volume chains {point_line(state)}")
    for tree in trees:
        lines.extend(_tree(tree))
    lines.append("}")
    return "\n".join(lines) + "\n"


def summary_to_dot(state: Replay, summary: Summary) -> str:
    counted = sum(n for _, n in summary.shapes) + summary.others
    title = (
        f"volume chains {point_line(state)}; summarised ({summary.nodes} nodes): "
        f"{len(summary.drawn)} trees with an image that needs attention drawn, {counted} "
        "trees counted by shape"
    )
    lines = _preamble(title)
    for tree in summary.drawn:
        lines.extend(_tree(tree))
    for n, ((volumes, images, depth, statuses), trees) in enumerate(summary.shapes):
        each = ", ".join(f"{count} {status}" for status, count in statuses)
        alike = "trees alike" if trees > 1 else "tree"
        label = (
            f"{trees} {alike}\n{volumes} volumes, chains up to {depth} deep\n"
            f"{images} images each: {each}"
        )
        worst = max((s for s, _ in statuses), key=lambda s: _SEVERITY.get(s, 0))
        colour = COLOURS.get(worst, "white")
        lines.append(
            f"  {quote(f'shape:{n}')} [shape=box3d, style=filled, fillcolor={colour}, "
            f"label={quote(label)}];"
        )
    if summary.others:
        label = f"{summary.others} more trees\nof shapes too many to list"
        lines.append(f"  {quote('shape:others')} [shape=box3d, label={quote(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


_SEVERITY = {"removed": 1, "degraded": 2, "broken": 3}  # a group is coloured by its worst


def summary_note(summary: Summary) -> str:
    counted = sum(n for _, n in summary.shapes) + summary.others
    return (
        f"the graph has {summary.nodes} nodes, more than Graphviz draws in seconds "
        f"({DRAWN_NODES}): drawn summarised, the {len(summary.drawn)} trees with an image that "
        f"needs attention in full and the other {counted} counted by shape; --full draws every "
        "node (it may take minutes), --format dot writes them all as text"
    )


def _preamble(title: str) -> list[str]:
    return [
        "digraph strata {",
        f"  label={quote(title)};",
        '  labelloc="t"; rankdir="BT";',
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]


def _tree(tree: Tree) -> list[str]:
    lines = []
    for row in tree.images:
        image = quote("image:" + row["image_id"])
        lines.append(f"  {image} [{image_attributes(row)}];")
        lines.append(f"  {image} -> {quote(row['chain'][-1])} [style=dotted];")
    for ref, exists in sorted(tree.volumes.items()):
        volume_id, fmt = ops.split_ref(ref)
        style = "" if exists else ', style="dashed"'
        label = f"{volume_id[:8]}… {fmt}" + ("" if exists else "\n(not made yet)")
        lines.append(f"  {quote(ref)} [shape=box, label={quote(label)}{style}];")
    for child, parent in sorted(tree.edges):
        lines.append(f"  {quote(child)} -> {quote(parent)};")
    return lines


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
