"""``strata-log replay`` and ``history`` on a log the engine wrote while it ran."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.log_tools.cli import Story, data, strata_log

# What the facade's get_image_info and get_image_status said, as replay names it.
REPORTED: tuple[str, ...] = ("kind", "size", "user_data", "chain_depth", "status", "stage")
REPORTED += ("percent_complete", "host_id", "last_error")
POINTS = [
    "web made",
    "snapshot, clone and a held disk",
    "snapshot removed, web resized",
    "merged and cleaned",
    "a host died holding a claim",
]


def live_images(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        row["image_id"]: {k: row[k] for k in REPORTED}
        for row in state["images"]
        if not row["removed"]
    }


def reported(point: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i: {k: v[k] for k in REPORTED} for i, v in point["images"].items()}


def fixes(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: f[k] for k in ("type", "image_ids", "data")} for f in state["fixes"]]


@pytest.mark.parametrize("name", POINTS)
def test_replay_until_a_point_shows_what_the_engine_reported_then(story: Story, name: str) -> None:
    point = story.point(name)
    state = data("replay", story.repo, "--until", str(point["position"]))
    assert state["position"] == point["position"]
    assert live_images(state) == reported(point)
    assert fixes(state) == point["fixes"]
    at_that_time = data("replay", story.log, "--until", state["time"])
    assert at_that_time["position"] == point["position"]
    assert live_images(at_that_time) == reported(point)


def test_replay_names_every_image_with_kind_size_status_stage_and_host(story: Story) -> None:
    done = strata_log("replay", story.repo)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "the end of the log" in lines[1]
    victim = next(line for line in lines if line.startswith(story.ids["victim"]))
    assert victim.split()[1:7] == ["virtual-disk", "1048576", "broken", "1/1", "-1", "host-dead"]
    removed = next(line for line in lines if line.startswith(story.ids["snap"]))
    assert removed.split()[1:4] == ["snapshot", "1048576", "removed"]
    assert "fixes a check would have offered then: 1" in done.stdout
    assert "from the log alone" in done.stdout


def test_history_shows_every_event_of_an_image_with_time_host_and_changes(story: Story) -> None:
    done = strata_log("history", story.repo, story.ids["web"], "--json")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    events = [e["event"] for e in entries]
    assert events[:3] == ["ImageRequested", "StageClaimed", "StageCompleted"]
    assert "SnapshotTaken" in events and "ImageResized" in events
    # The merge ran on web or on the clone; either way web's chain lost the snapshot's volume.
    assert {"FixRequested", "ChainChanged"} & set(events)
    chains = [e["changed"]["chain"] for e in entries if "chain" in e["changed"]]
    assert [len(new) for _, new in chains] == [1, 2, 1]
    assert [e["version"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["host_id"] == "host-a" and e["time"].endswith("Z") for e in entries)
    assert entries[0]["fields"]["user_data"] == {"name": "web01"}
    assert entries[0]["changed"]["status"] == [None, "broken"]
    assert entries[2]["changed"]["status"] == ["broken", "optimized"]
    snapshot = entries[events.index("SnapshotTaken")]
    assert snapshot["fields"]["snapshot_id"] == story.ids["snap"]
    assert snapshot["changed"]["chain"][1][:-1] == snapshot["changed"]["chain"][0]


def test_history_of_a_removed_image_shows_its_removal_with_the_reason_field(story: Story) -> None:
    done = strata_log("history", story.log, story.ids["snap"])
    assert done.returncode == 0, done.stderr
    removal = next(line for line in done.stdout.splitlines() if "ImageRemoved" in line)
    assert "reason=''" in removal
    assert "removed: False -> True" in done.stdout
