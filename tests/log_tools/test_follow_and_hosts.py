"""``strata-log follow`` while another host appends, and ``hosts`` after one died."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from engine import StorageEngine
from engine.log.reader import ReadOnlyLog
from tests.log_tools.cli import Story, data, strata_log

MiB = 2**20


def test_follow_prints_the_records_another_host_appends_as_they_come(
    log_copy: Path, tmp_path: Path
) -> None:
    last = max(r.seq for r in ReadOnlyLog(str(log_copy / "log")).records())
    bounds = ["--from", str(last + 1), "--count", "3", "--timeout", "30", "--poll", "0.1"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "log_tools", "follow", str(log_copy), "--json", *bounds],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with StorageEngine("host-b", state_dir=str(tmp_path / "b"), run_executors=False) as se:
            se.connect_storage_repository("r", "localfs-1.0", {"path": str(log_copy)})
            disk = se.create_virtual_disk("r", MiB)
            se.set_user_data("r", disk, {"name": "followed"})
            se.stop_fix("r", disk, reason="seen live")
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in records] == [last + 1, last + 2, last + 3]
    assert [r["topic"].rsplit(".", 1)[1] for r in records] == [
        "ImageRequested", "UserDataSet", "FixStopped",
    ]  # fmt: skip
    assert {r["host_id"] for r in records} == {"host-b"}
    assert {r["originator_id"] for r in records} == {disk}


def test_follow_stops_after_its_timeout_when_nothing_is_appended(story: Story) -> None:
    started = time.monotonic()
    done = strata_log("follow", story.repo, "--timeout", "0.5", "--poll", "0.1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert time.monotonic() - started < 10
    assert not (story.log / "torn").exists()


def test_follow_from_the_start_prints_the_log_then_stops_at_count(story: Story) -> None:
    done = strata_log("follow", story.log, "--from", "1", "--count", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == [1, 2, 3, 4]
    assert "strata.repository.Repository.Created" in lines[0]


def test_hosts_names_each_host_its_heartbeat_and_the_stage_a_dead_one_left_claimed(
    story: Story,
) -> None:
    report = data("hosts", story.repo)
    hosts = {h["host_id"]: h for h in report["hosts"]}
    assert set(hosts) == {"host-a", "host-dead", "auditor"}
    assert hosts["host-dead"]["state"] == "dead"
    assert hosts["host-dead"]["heartbeat"]["released"] is False
    assert hosts["host-dead"]["heartbeat_age_seconds"] >= 1.0
    assert hosts["host-a"]["state"] == "left"  # it disconnected cleanly
    assert hosts["auditor"]["records"] == 0 and hosts["auditor"]["state"] == "left"
    (claim,) = report["claims"]
    assert claim["image_id"] == story.ids["victim"]
    assert (claim["host_id"], claim["stage"], claim["epoch"], claim["left_claimed"]) == (
        "host-dead", "1/1", 1, True,
    )  # fmt: skip
    assert claim["claimed_seq"] == story.point("a host died holding a claim")["position"]
    text = strata_log("hosts", story.repo).stdout
    assert "stages left claimed by hosts that are not alive: 1" in text
    assert f"host-dead (dead): image {story.ids['victim']} create stage 1/1" in text


def test_hosts_of_a_log_directory_alone_shows_heartbeats_as_unknown(
    story: Story, tmp_path: Path
) -> None:
    shutil.copytree(story.log, tmp_path / "log")
    report = data("hosts", tmp_path / "log")
    assert report["repository"] is None
    assert {h["state"] for h in report["hosts"]} == {"unknown"}
    assert {h["host_id"] for h in report["hosts"]} == {"host-a", "host-dead"}
    (claim,) = report["claims"]
    assert (claim["host_id"], claim["host_state"], claim["left_claimed"]) == (
        "host-dead", "unknown", True,
    )  # fmt: skip
