"""Golden logs written by earlier versions replay to the state the engine reported then.

Every directory under ``tests/replay/golden/`` holds a ``log/`` and an ``expected.json`` that
``make_golden.py`` wrote while the engine ran (see README.md). Nothing there is ever edited.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from eventsourcing.persistence import StoredEvent

from engine import StorageEngine
from engine.aggregates.image import Image
from engine.formats.repository.registry import get_format
from engine.log import VERSION
from engine.log.reader import ReadOnlyLog
from engine.projections.log_events import new_mapper
from engine.projections.point_in_time import Until, replay

GOLDEN = Path(__file__).with_name("golden")
LOGS = sorted(p.parent for p in GOLDEN.glob("*/expected.json"))
# What the facade reported of each image, as replay names it.
COMPARED: tuple[str, ...] = ("kind", "size", "user_data", "created", "chain_depth", "status")
COMPARED += ("stage", "percent_complete", "host_id", "last_error")


def expected(golden: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((golden / "expected.json").read_text())
    return data


def fixes_of(result: Any) -> list[dict[str, Any]]:
    return [
        {"type": f.type, "image_ids": list(f.image_ids), "data": f.data} for f in result.fixes()
    ]


def test_there_is_a_golden_log_of_the_current_log_format_version() -> None:
    versions = {expected(g)["log_format_version"] for g in LOGS}
    assert VERSION in versions


@pytest.mark.parametrize("golden", LOGS, ids=[g.name for g in LOGS])
def test_a_golden_log_is_sound_and_holds_every_point_it_was_checked_at(golden: Path) -> None:
    log = ReadOnlyLog(str(golden / "log"))
    records = list(log.records())
    assert log.tail is not None and not log.tail.torn
    assert log.headers[1].version == expected(golden)["log_format_version"]
    by_seq = {r.seq: r for r in records}
    for point in expected(golden)["points"]:
        assert by_seq[point["position"]].time_ns == point["time_ns"]


@pytest.mark.parametrize("golden", LOGS, ids=[g.name for g in LOGS])
def test_a_golden_log_replays_to_what_the_engine_reported_at_each_point(golden: Path) -> None:
    for point in expected(golden)["points"]:
        by_seq = replay(str(golden / "log"), Until(seq=point["position"]))
        by_time = replay(str(golden / "log"), Until(time_ns=point["time_ns"]))
        assert by_seq.position == by_time.position == point["position"], point["name"]
        rows = {row["image_id"]: row for row in by_seq.statuses()}
        live = {
            i: {k: rows[i][k] for k in COMPARED} for i, row in rows.items() if not row["removed"]
        }
        assert live == {i: {k: v[k] for k in COMPARED} for i, v in point["images"].items()}
        removed = {i for i, row in rows.items() if row["removed"]}
        assert set(point["removed"]) <= removed, point["name"]
        # The others removed are carriers of clean fixes: requested and removed at once.
        assert all(rows[i]["chain_depth"] == 0 for i in removed - set(point["removed"]))
        assert fixes_of(by_seq) == point["fixes"], point["name"]


@pytest.mark.parametrize("golden", LOGS, ids=[g.name for g in LOGS])
def test_a_golden_log_s_removals_were_written_before_reason_existed_and_upcast_to_none(
    golden: Path,
) -> None:
    mapper = new_mapper()
    removals = [
        r for r in ReadOnlyLog(str(golden / "log")).records() if r.topic == Image.ImageRemoved.TOPIC
    ]
    assert removals
    for record in removals:
        assert "class_version" not in msgpack.unpackb(record.state)  # written as version 1
        event = mapper.to_domain_event(
            StoredEvent(record.originator_id, record.originator_version, record.topic, record.state)
        )
        assert isinstance(event, Image.ImageRemoved)
        assert vars(event)["reason"] == ""  # set by upcast_v1_v2, not a class default


def test_a_removal_written_now_carries_its_class_version_and_reason() -> None:
    mapper = new_mapper()
    image = Image.request(
        image_id=uuid.uuid4(), kind="virtual-disk", size=1, chain=[], user_data=None,
        strategy="space", auto_fix=True, origin={}, operations=[], host_id="host-a",
        now=datetime.now(UTC),
    )  # fmt: skip
    image.remove(host_id="host-a", now=image.created_on, reason="decommissioned")
    stored = mapper.to_stored_event(image.collect_events()[-1])
    assert msgpack.unpackb(stored.state)["class_version"] == 2
    event = mapper.to_domain_event(stored)
    assert isinstance(event, Image.ImageRemoved) and event.reason == "decommissioned"


@pytest.mark.parametrize("golden", LOGS, ids=[g.name for g in LOGS])
def test_the_engine_itself_opens_a_golden_log_and_reports_the_last_point(
    golden: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    get_format(expected(golden)["repository_format"]).create({"path": str(repo)}, "host-x")
    shutil.rmtree(repo / "log")
    shutil.copytree(golden / "log", repo / "log")
    last = expected(golden)["points"][-1]
    # The golden log's volumes were not kept, and a status looks at the files (a missing one
    # makes the image broken, ADR 0017): stand in a file for each volume its chains hold.
    for row in replay(str(golden / "log"), Until(seq=last["position"])).statuses():
        for ref in row["chain"]:
            (repo / "volumes" / ref).touch()
    with StorageEngine("auditor", state_dir=str(tmp_path / "s"), run_executors=False) as se:
        se.connect_storage_repository(
            "g", expected(golden)["repository_format"], {"path": str(repo)}
        )
        reported = {
            i.image_id: {**i.to_dict(), **se.get_image_status("g", i.image_id).to_dict()}
            for i in se.list_images("g")
        }
    assert {i: {k: v[k] for k in COMPARED} for i, v in reported.items()} == {
        i: {k: v[k] for k in COMPARED} for i, v in last["images"].items()
    }
