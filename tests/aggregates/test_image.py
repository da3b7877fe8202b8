"""The Image aggregate on its own: pure decisions, no files, no log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CopyStage, RebaseStage
from engine.errors import ClaimLost, ImageInUse, ImageNotFound, ImageNotReady, WrongImageKind

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def vol(n: int, fmt: str = "qcow2") -> str:
    return ops.volume_ref(f"{n:032x}", fmt)


def disk(*, strategy: str = ops.SPACE, auto_fix: bool = True) -> Image:
    plan = ops.plan("create", "create", {"do": "create", "volume": vol(1), "size": 512})
    optimize: CopyStage = {  # a stand-in: the aggregate never reads where a copy comes from
        "do": "copy", "source_image": "", "volume": vol(2, "raw"), "set_chain": [vol(2, "raw")]
    }  # fmt: skip
    work = [plan]
    if strategy == ops.PERFORMANCE:
        work.append(ops.plan("opt", ops.OPTIMIZE, optimize))
    return Image.request(
        image_id=uuid.uuid4(), kind=ops.VIRTUAL_DISK, size=512, chain=[vol(1)], user_data=None,
        strategy=strategy, auto_fix=auto_fix, origin={}, operations=work, host_id="a", now=NOW,
    )  # fmt: skip


def run_all(image: Image, host: str = "a") -> None:
    while (op := image.current_operation()) is not None and op.state == ops.PENDING:
        epoch = image.claim(op_id=op.op_id, stage=op.done, host_id=host, now=NOW)
        image.complete(op_id=op.op_id, stage=op.done, epoch=epoch, host_id=host, now=NOW)


def test_an_outcome_from_a_host_whose_claim_moved_on_is_refused() -> None:
    image = disk()
    first = image.claim(op_id="create", stage=0, host_id="a", now=NOW)
    image.claim(op_id="create", stage=0, host_id="b", now=NOW)  # a takeover
    with pytest.raises(ClaimLost):
        image.complete(op_id="create", stage=0, epoch=first, host_id="a", now=NOW)
    with pytest.raises(ClaimLost):
        image.progress(op_id="create", stage=0, epoch=first, percent=50, host_id="a", now=NOW)


def test_only_the_next_stage_can_be_claimed() -> None:
    image = disk()
    with pytest.raises(ClaimLost):
        image.claim(op_id="create", stage=1, host_id="a", now=NOW)
    with pytest.raises(ClaimLost):
        image.claim(op_id="nope", stage=0, host_id="a", now=NOW)


def test_auto_fix_off_holds_the_work_until_a_fix_releases_it() -> None:
    image = disk(auto_fix=False)
    assert image.current_operation().state == ops.HELD  # type: ignore[union-attr]
    with pytest.raises(ClaimLost):
        image.claim(op_id="create", stage=0, host_id="a", now=NOW)
    assert image.request_fix(
        fix_type=ops.MEND, op_id="create", operation=None, host_id="b", now=NOW
    )
    assert not image.request_fix(
        fix_type=ops.MEND, op_id="create", operation=None, host_id="c", now=NOW
    )
    run_all(image)
    assert image.current_operation() is None


def test_a_snapshot_supersedes_a_pending_optimization_and_replans() -> None:
    image = disk(strategy=ops.PERFORMANCE)
    epoch = image.claim(op_id="create", stage=0, host_id="a", now=NOW)
    image.complete(op_id="create", stage=0, epoch=epoch, host_id="a", now=NOW)
    replan = ops.plan(
        "opt2", ops.OPTIMIZE, {"do": "copy", "source_image": "", "volume": vol(4, "raw")}
    )
    overlay = ops.plan("snap", "snapshot", {"do": "create", "volume": vol(3), "backing": vol(1)})
    frozen = image.take_snapshot(
        snapshot_id=uuid.uuid4(), new_top=vol(3), operations=[overlay, replan], host_id="a", now=NOW
    )
    assert frozen == [vol(1)] and image.chain == [vol(1), vol(3)]
    assert image.operation("opt").state == ops.DONE  # type: ignore[union-attr]
    assert [op.op_id for op in image.operations if not op.finished] == ["snap", "opt2"]


def test_a_merge_drops_its_volume_from_the_chain_as_it_is_when_it_completes() -> None:
    image = disk()
    run_all(image)
    image.change_chain(chain=[vol(9), vol(1)], reason="test", host_id="a", now=NOW)
    stage: RebaseStage = {"do": "rebase", "volume": vol(1), "backing": None}
    merge = ops.plan("merge", ops.MERGE, {**stage, "set_chain": [vol(1)], "drop_volume": vol(9)})
    image.request_fix(fix_type=ops.MERGE, op_id="merge", operation=merge, host_id="a", now=NOW)
    overlay = ops.plan("snap", "snapshot", {"do": "create", "volume": vol(5), "backing": vol(1)})
    image.take_snapshot(
        snapshot_id=None, new_top=vol(5), operations=[overlay], host_id="a", now=NOW
    )
    run_all(image)
    assert image.chain == [vol(1), vol(5)]  # not the plan's [vol(1)]: the new top stays


def test_stopping_records_why_and_a_mend_resumes() -> None:
    image = disk()
    assert image.stop(reason="overloaded", host_id="b", now=NOW) == "create"
    assert image.last_error is not None and "overloaded" in image.last_error
    image.request_fix(fix_type=ops.MEND, op_id="create", operation=None, host_id="b", now=NOW)
    run_all(image)
    assert image.last_error is None and image.current_operation() is None


def test_removed_prepared_and_wrong_kind_images_refuse_commands() -> None:
    image = disk()
    image.prepare(host_id="a", now=NOW)
    with pytest.raises(ImageInUse):
        image.remove(host_id="a", now=NOW)
    image.tear_down(host_id="a", now=NOW)
    image.remove(host_id="a", now=NOW)
    with pytest.raises(ImageNotFound):
        image.set_user_data(user_data=1, host_id="a", now=NOW)
    snap = Image.request(
        image_id=uuid.uuid4(), kind=ops.SNAPSHOT, size=512, chain=[vol(1)], user_data=None,
        strategy=ops.SPACE, auto_fix=True, origin={}, operations=[], host_id="a", now=NOW,
    )  # fmt: skip
    with pytest.raises(WrongImageKind):
        snap.take_snapshot(snapshot_id=None, new_top=vol(2), operations=[], host_id="a", now=NOW)


def test_replaying_the_recorded_events_gives_the_same_image() -> None:
    image = disk(strategy=ops.PERFORMANCE)
    run_all(image)
    image.set_user_data(user_data={"k": [1, 2]}, host_id="b", now=NOW)
    events = image.collect_events()
    replayed = Image.project(None, events)
    assert replayed is not None
    assert (replayed.chain, replayed.version, replayed.user_data, replayed.last_host) == (
        image.chain, image.version, image.user_data, "b",
    )  # fmt: skip
    assert [(o.op_id, o.state) for o in replayed.operations] == [
        (o.op_id, o.state) for o in image.operations
    ]


def test_a_volume_reference_with_a_trailing_newline_is_not_one() -> None:
    with pytest.raises(ValueError, match="not a volume reference"):
        ops.split_ref(vol(1) + "\n")


def test_a_discarded_replica_takes_the_clean_that_frees_its_volumes() -> None:
    replica = Image.request(
        image_id=uuid.uuid4(), kind=ops.VIRTUAL_DISK, size=512, chain=[vol(1)], user_data=None,
        strategy=ops.SPACE, auto_fix=True, origin={"how": "replica", "of": "/srv/r1"},
        operations=[], host_id="a", now=NOW,
    )  # fmt: skip
    clean = ops.plan("clean", ops.CLEAN, {"do": "delete", "volumes": [vol(1)]})
    with pytest.raises(ImageNotReady):  # the migration fills it
        replica.request_fix(
            fix_type=ops.CLEAN, op_id="clean", operation=clean, host_id="a", now=NOW
        )
    replica.discard_replica(reason="aborted", host_id="a", now=NOW)
    assert replica.request_fix(
        fix_type=ops.CLEAN, op_id="clean", operation=clean, host_id="a", now=NOW
    )
    run_all(replica)
    assert replica.current_operation() is None
