"""How a large graph is summarised: what is drawn in full, what is counted, and the bound."""

from __future__ import annotations

from typing import Any

from log_tools.chains import Tree, summarise


def tree(statuses: list[str], depth: int = 1, removed: bool = False) -> Tree:
    """A base volume with one chain of ``depth`` volumes per image."""
    made = Tree()
    for n, status in enumerate(statuses):
        chain = ["base.qcow2", *(f"v{n}-{k}.qcow2" for k in range(1, depth))]
        row: dict[str, Any] = {"status": status, "removed": removed, "chain": chain}
        made.images.append(row)
        made.volumes.update(dict.fromkeys(chain, True))
    return made


def test_trees_that_need_attention_are_drawn_while_they_fit_and_the_rest_counted() -> None:
    fine = [tree(["optimized"]) for _ in range(30)]
    broken = [tree(["broken", "optimized"]) for _ in range(7)]  # 3 nodes each
    summary = summarise([*fine, *broken], limit=20)  # 18 nodes to draw, 2 for shapes
    assert summary.drawn == broken[:6]
    both = (("broken", 1), ("optimized", 1))
    assert summary.shapes == [((1, 1, 1, (("optimized", 1),)), 30), ((1, 2, 1, both), 1)]
    assert summary.others == 0
    assert summary.nodes == 30 * 2 + 7 * 3


def test_shapes_beyond_the_bound_are_counted_together() -> None:
    many = [tree(["optimized"], depth=d) for d in range(1, 8) for _ in range(d)]
    summary = summarise(many, limit=30)  # 3 shape nodes: 2 shapes and "others"
    assert [count for _, count in summary.shapes] == [7, 6]
    assert summary.others == sum(range(1, 6))
    assert summary.drawn == []


def test_removed_images_whose_volumes_remain_need_attention() -> None:
    assert tree(["optimized"], removed=True).needs_attention
    assert not tree(["optimized", "optimized"]).needs_attention
