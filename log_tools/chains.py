"""The volume trees ``strata-log graph`` draws, and a summary of them in few nodes.

Every chain starts at the base volume of its tree, so the images whose chains share a first
volume (a disk, its snapshots, the clones made from them) make one tree. Graphviz's layout
takes time that grows much faster than the nodes (seconds for 2,000, minutes for tens of
thousands), so a large repository is drawn summarised: the trees holding an image that needs
attention (not optimized, or removed with its volumes still there) in full while they fit, and
the other trees counted in one node per shape.

Imports: ``engine.projections``, ``engine.types``; the standard library.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.projections.point_in_time import Replay, log_volume_files
from engine.types import OPTIMIZED

Shape = tuple[int, int, int, tuple[tuple[str, int], ...]]


@dataclass
class Tree:
    images: list[dict[str, Any]] = field(default_factory=list)  # replay's status rows
    volumes: dict[str, bool] = field(default_factory=dict)  # ref -> made (exists)
    edges: set[tuple[str, str]] = field(default_factory=set)  # overlay -> backing

    @property
    def nodes(self) -> int:
        return len(self.images) + len(self.volumes)

    @property
    def needs_attention(self) -> bool:
        return any(row["removed"] or row["status"] != OPTIMIZED for row in self.images)

    def shape(self) -> Shape:
        """Volumes, images, depth, and the images by status: what trees alike share."""
        depth = max(len(row["chain"]) for row in self.images)
        statuses = Counter(_status(row) for row in self.images)
        return len(self.volumes), len(self.images), depth, tuple(sorted(statuses.items()))


@dataclass(frozen=True)
class Summary:
    drawn: list[Tree]  # in full
    shapes: list[tuple[Shape, int]]  # a shape and how many trees have it, most first
    others: int  # trees of shapes too rare to get a node of their own
    nodes: int  # of the whole graph


def trees(state: Replay) -> list[Tree]:
    """Every tree with a volume to draw, in the order of their base volumes."""
    existing = {f"{f.volume_id}.{f.fmt}" for f in log_volume_files(state.view)}
    found: dict[str, Tree] = {}
    for row in state.statuses():
        chain = row["chain"]
        if not chain or (row["removed"] and not any(ref in existing for ref in chain)):
            continue
        tree = found.setdefault(chain[0], Tree())
        tree.images.append(row)
        for ref in chain:
            tree.volumes[ref] = ref in existing
        tree.edges.update(zip(chain[1:], chain[:-1], strict=True))
    return [found[base] for base in sorted(found)]


def summarise(all_trees: list[Tree], limit: int) -> Summary:
    """The trees that need attention in full while they fit under ``limit`` nodes (a tenth
    of it kept for the counted shapes), and every other tree counted by shape."""
    kept = limit // 10
    budget = limit - kept
    drawn: list[Tree] = []
    shapes: Counter[Shape] = Counter()
    for tree in all_trees:
        if tree.needs_attention and tree.nodes <= budget:
            drawn.append(tree)
            budget -= tree.nodes
        else:
            shapes[tree.shape()] += 1
    common = shapes.most_common()
    others = sum(n for _, n in common[kept - 1 :]) if len(common) > kept else 0
    common = common[: kept - 1] if others else common
    return Summary(drawn, common, others, sum(t.nodes for t in all_trees))


def _status(row: dict[str, Any]) -> str:
    return "removed" if row["removed"] else str(row["status"])
