"""``strata-log graph`` on a repository too large for Graphviz to lay out in full quickly.

Reported: SVG of a 200,000-event log ran Graphviz for a minute, then a traceback and the exit
status that means "damaged". 1,205 disks (2,410 nodes) are past the limit and take a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from log_tools.graph import DRAWN_NODES
from tests.log_tools.cli import one_line_error, strata_log
from tests.log_tools.many_images import write_disks

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is missing")


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    repo = tmp_path_factory.mktemp("large")
    broken = write_disks(repo / "log", made=1200, broken=5)
    return repo, broken


def fake_dot(directory: Path, script: str) -> dict[str, str]:
    """An environment whose PATH finds a ``dot`` that runs ``script`` instead of Graphviz."""
    directory.mkdir()
    dot = directory / "dot"
    dot.write_text(f"#!/bin/sh\n{script}\n")
    dot.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}:{os.environ['PATH']}"}


@needs_dot
def test_svg_of_a_large_repository_draws_the_images_that_need_attention_and_counts_the_rest(
    large: tuple[Path, list[str]], tmp_path: Path
) -> None:
    repo, broken = large
    out = tmp_path / "chains.svg"
    done = strata_log("graph", repo, "--format", "svg", "-o", out)
    assert done.returncode == 0, done.stderr
    (note,) = done.stderr.splitlines()
    assert note.startswith("strata-log: note: the graph has 2410 nodes")
    assert "summarised" in note and "--full" in note and "--format dot" in note
    svg = out.read_text()
    assert svg.startswith("<?xml")
    for image_id in broken:
        assert f"<title>image:{image_id.replace('-', '&#45;')}</title>" in svg
    assert svg.count("<title>image:") == 2 * len(broken)  # each node and its dotted arrow
    assert "1200 trees alike" in svg and "1 images each: 1 optimized" in svg
    assert os.listdir(tmp_path) == ["chains.svg"]


def test_dot_text_of_a_large_repository_holds_every_node(large: tuple[Path, list[str]]) -> None:
    repo, _ = large
    done = strata_log("graph", repo)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    nodes = [line for line in done.stdout.splitlines() if "[shape=" in line]
    assert len(nodes) == 2410 > DRAWN_NODES


def test_graphviz_that_runs_too_long_is_stopped_with_a_message_not_called_damage(
    large: tuple[Path, list[str]], tmp_path: Path
) -> None:
    repo, _ = large
    env = fake_dot(tmp_path / "bin", "exec sleep 60")
    out = tmp_path / "chains.svg"
    args = ["graph", str(repo), "--format", "svg", "--full", "--timeout", "0.5", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "log_tools", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    one_line_error(done, 3, "tool_failed", "did not finish", "2410 nodes", "0.5 s", "--timeout")
    assert os.listdir(tmp_path) == ["bin"]  # no output, no temporary


def test_graphviz_that_fails_is_reported_in_one_line(
    large: tuple[Path, list[str]], tmp_path: Path
) -> None:
    repo, _ = large
    env = fake_dot(tmp_path / "bin", "echo 'Error: out of memory' >&2; exit 1")
    done = subprocess.run(
        [sys.executable, "-m", "log_tools", "graph", str(repo), "--format", "png", "--full"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    one_line_error(done, 3, "Graphviz's dot failed: Error: out of memory", "--format dot")
    assert done.stdout == ""
