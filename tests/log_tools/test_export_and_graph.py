"""``strata-log export`` (SQLite for Datasette) and ``graph`` (Graphviz) on a real run's log."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.log_tools.cli import Story, data, one_line_error, strata_log


def test_export_writes_images_events_fixes_hosts_and_claims_as_sqlite_tables(
    story: Story, tmp_path: Path
) -> None:
    target = tmp_path / "strata.sqlite"
    done = strata_log("export", story.repo, target)
    assert done.returncode == 0, done.stderr
    state = data("replay", story.repo)
    db = sqlite3.connect(target)
    images = {row[0]: row[1:] for row in db.execute("SELECT image_id, status, stage FROM images")}
    assert images == {r["image_id"]: (r["status"], r["stage"]) for r in state["images"]}
    events = db.execute("SELECT seq, event, aggregate_id FROM events ORDER BY seq").fetchall()
    assert [seq for seq, _, _ in events] == list(range(1, state["position"] + 1))
    assert events[0][1:] == ("Created", "repository")
    web = [e for _, e, image in events if image == story.ids["web"]]
    assert web[:3] == ["ImageRequested", "StageClaimed", "StageCompleted"]
    (fields,) = db.execute(
        "SELECT fields FROM events WHERE aggregate_id = ? AND event = 'ImageRemoved'",
        [story.ids["snap"]],
    ).fetchone()
    assert json.loads(fields) == {"reason": ""}
    fixes = db.execute("SELECT type, image_ids, data FROM fixes ORDER BY position").fetchall()
    assert [(t, json.loads(i), d) for t, i, d in fixes] == [
        (f["type"], f["image_ids"], f["data"]) for f in state["fixes"]
    ]
    hosts = dict(db.execute("SELECT host_id, records FROM hosts").fetchall())
    assert hosts["host-a"] > 0 and hosts["host-dead"] == 2 and hosts["auditor"] == 0
    claims = db.execute("SELECT image_id, host_id, left_claimed FROM claims").fetchall()
    assert claims == [(story.ids["victim"], "host-dead", 1)]
    assert os.listdir(tmp_path) == ["strata.sqlite"]  # no temporary file left behind


def test_export_up_to_a_point_holds_only_what_the_log_held_then(
    story: Story, tmp_path: Path
) -> None:
    point = story.point("web made")
    target = tmp_path / "then.sqlite"
    assert (
        strata_log("export", story.log, target, "--until", str(point["position"])).returncode == 0
    )
    db = sqlite3.connect(target)
    assert db.execute("SELECT max(seq) FROM events").fetchone() == (point["position"],)
    assert db.execute("SELECT image_id, status FROM images").fetchall() == [
        (story.ids["web"], "optimized")
    ]
    assert db.execute("SELECT count(*) FROM claims").fetchone() == (0,)


def test_export_refuses_to_overwrite_a_file_unless_told_to(story: Story, tmp_path: Path) -> None:
    target = tmp_path / "mine.sqlite"
    target.write_text("precious")
    one_line_error(strata_log("export", story.repo, target), 2, "--replace")
    assert target.read_text() == "precious"
    assert strata_log("export", story.repo, target, "--replace").returncode == 0
    assert sqlite3.connect(target).execute("SELECT count(*) FROM images").fetchone()[0] > 0


def test_graph_draws_each_chain_and_labels_images_with_their_status(story: Story) -> None:
    point = story.point("snapshot, clone and a held disk")
    done = strata_log("graph", story.repo, "--until", str(point["position"]))
    assert done.returncode == 0, done.stderr
    dot = done.stdout
    assert dot.startswith("digraph strata {") and dot.rstrip().endswith("}")
    state = data("replay", story.repo, "--until", str(point["position"]))
    rows = {r["image_id"]: r for r in state["images"]}
    web, clone = rows[story.ids["web"]], rows[story.ids["clone"]]
    base, web_top = web["chain"]
    assert clone["chain"][0] == base  # the clone is an overlay on the snapshot's volume
    assert f'"{web_top}" -> "{base}";' in dot
    assert f'"{clone["chain"][1]}" -> "{base}";' in dot
    assert f'"image:{story.ids["web"]}" -> "{web_top}"' in dot
    assert "web01" in dot and "optimized 1/1" in dot
    assert "broken 1/1" in dot  # the held disk
    assert "(not made yet)" in dot  # its volume


def test_graph_writes_svg_and_png_with_dot(story: Story, tmp_path: Path) -> None:
    for fmt, magic in (("svg", b"<?xml"), ("png", b"\x89PNG")):
        out = tmp_path / f"chains.{fmt}"
        done = strata_log("graph", story.repo, "--format", fmt, "-o", out)
        if shutil.which("dot") is None:
            one_line_error(done, 2, "Graphviz", "--format dot")
        else:
            assert done.returncode == 0, done.stderr
            assert out.read_bytes().startswith(magic)


def test_graph_says_clearly_when_dot_is_missing_and_dot_text_still_works(
    story: Story, tmp_path: Path
) -> None:
    bare = {**os.environ, "PATH": str(tmp_path)}  # no dot anywhere on it
    args = [sys.executable, "-m", "log_tools", "graph", str(story.repo)]
    done = subprocess.run([*args, "--format", "svg"], env=bare, capture_output=True, text=True)
    one_line_error(done, 2, "dot", "not installed", "--format dot")
    text = subprocess.run(args, env=bare, capture_output=True, text=True)
    assert text.returncode == 0 and text.stdout.startswith("digraph")
