"""engine.projections.point_in_time: leaving out overwritten records changes nothing; the points."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CreateStage
from engine.errors import InvalidParameter
from engine.log import NewEvent, OperationLog
from engine.projections.folded_state import to_state
from engine.projections.log_events import new_mapper
from engine.projections.point_in_time import Replay, Until, replay

GOLDEN = sorted(p.parent / "log" for p in Path(__file__).parent.glob("golden/*/expected.json"))


def folded(state: Replay) -> dict[str, object]:
    """Everything the view holds of each image, who worked on it last, and its status."""
    return {
        str(i.id): (to_state(i), state.view.worker(i.id), [state.view.is_ready(v) for v in i.chain])
        for i in state.view.images()
    } | {"statuses": state.statuses(), "fixes": [f.data for f in state.fixes()]}


def progress_heavy_log(log_dir: Path) -> None:
    """Three disks whose stages report progress, interleaved: one completes, one fails after
    progress, a stage is taken over by another host after progress (a new claim), and a
    stage taken over before any progress completes under the new claim."""
    mapper = new_mapper()
    clock = datetime(2026, 1, 1, tzinfo=UTC)

    def now() -> datetime:
        nonlocal clock
        clock += timedelta(milliseconds=1)
        return clock

    disks = []
    for n in range(3):
        top = ops.volume_ref(uuid.uuid4().hex, "qcow2")
        stage: CreateStage = {"do": "create", "volume": top, "size": 1}
        disks.append(
            Image.request(
                image_id=uuid.uuid4(), kind=ops.VIRTUAL_DISK, size=1, chain=[top],
                user_data={"n": n}, strategy=ops.SPACE, auto_fix=True, origin={},
                operations=[ops.plan(uuid.uuid4().hex, "create", stage, stage.copy())],
                host_id="host-a", now=now(),
            )
        )  # fmt: skip
    a, b, c = disks
    op_a, op_b, op_c = (d.operations[0].op_id for d in disks)
    c.claim(op_id=op_c, stage=0, host_id="host-a", now=now())
    ec = c.claim(op_id=op_c, stage=0, host_id="host-b", now=now(), take_over="host-a")
    c.progress(op_id=op_c, stage=0, epoch=ec, percent=50, host_id="host-b", now=now())
    c.complete(op_id=op_c, stage=0, epoch=ec, host_id="host-b", now=now())
    ea = a.claim(op_id=op_a, stage=0, host_id="host-a", now=now())
    eb = b.claim(op_id=op_b, stage=0, host_id="host-b", now=now())
    for percent in (10, 40, 70):
        a.progress(op_id=op_a, stage=0, epoch=ea, percent=percent, host_id="host-a", now=now())
        b.progress(op_id=op_b, stage=0, epoch=eb, percent=percent, host_id="host-b", now=now())
    a.complete(op_id=op_a, stage=0, epoch=ea, host_id="host-a", now=now())
    ea = a.claim(op_id=op_a, stage=1, host_id="host-a", now=now())
    a.progress(op_id=op_a, stage=1, epoch=ea, percent=55, host_id="host-a", now=now())
    a.fail(op_id=op_a, stage=1, epoch=ea, error="disk full", host_id="host-a", now=now())
    eb = b.claim(op_id=op_b, stage=0, host_id="host-c", now=now())  # took over from host-b
    b.progress(op_id=op_b, stage=0, epoch=eb, percent=20, host_id="host-c", now=now())
    with OperationLog.create(str(log_dir), "host-a") as log:
        for image in (a, b, c):
            for event in image.collect_events():
                stored = mapper.to_stored_event(event)
                log.append(
                    [NewEvent(stored.originator_id, stored.originator_version, stored.topic,
                              stored.state)]
                )  # fmt: skip


@pytest.mark.parametrize("log_dir", GOLDEN, ids=[p.parent.name for p in GOLDEN])
def test_skipping_overwritten_progress_folds_a_golden_log_to_the_same_state(log_dir: Path) -> None:
    assert folded(replay(str(log_dir))) == folded(replay(str(log_dir), skip_superseded=False))


def test_skipping_overwritten_progress_keeps_what_no_later_record_overwrites(
    tmp_path: Path,
) -> None:
    progress_heavy_log(tmp_path / "log")
    skipped, everything = (
        replay(str(tmp_path / "log")),
        replay(str(tmp_path / "log"), None, skip_superseded=False),
    )
    assert folded(skipped) == folded(everything)
    # Left out: a's 3 progress records and first claim; b's 3 progress records and first
    # claim; c's progress and both claims.
    assert everything.view.records_read - skipped.view.records_read == 4 + 4 + 3
    percents = sorted(op.percent for i in skipped.view.images() for op in i.operations)
    # The failed stage keeps its last progress, as does the running one; c's next stage has
    # none yet.
    assert percents == [-1, 20, 55]
    (c,) = [i for i in skipped.view.images() if i.user_data == {"n": 2}]
    assert [(op.claim_epoch, op.claim_host, op.percent) for op in c.operations] == [(2, None, -1)]
    for position in range(1, everything.position + 1):
        assert folded(replay(str(tmp_path / "log"), Until(seq=position))) == folded(
            replay(str(tmp_path / "log"), Until(seq=position), skip_superseded=False)
        )


def test_a_point_inside_a_transaction_stops_before_it(tmp_path: Path) -> None:
    with OperationLog.create(str(tmp_path / "log"), "host-a") as log:
        image = Image.request(
            image_id=uuid.uuid4(), kind=ops.SNAPSHOT, size=1, chain=[], user_data=None,
            strategy=ops.SPACE, auto_fix=True, origin={}, operations=[], host_id="host-a",
            now=datetime.now(UTC),
        )  # fmt: skip
        image.remove(host_id="host-a", now=datetime.now(UTC))
        mapper = new_mapper()
        stored = [mapper.to_stored_event(e) for e in image.collect_events()]
        log.append(
            [NewEvent(s.originator_id, s.originator_version, s.topic, s.state) for s in stored]
        )
    assert replay(str(tmp_path / "log"), Until(seq=1)).position == 0
    assert replay(str(tmp_path / "log"), Until(seq=2)).position == 2
    with pytest.raises(InvalidParameter, match="past the end of the log, which ends at 2"):
        replay(str(tmp_path / "log"), Until(seq=3))
