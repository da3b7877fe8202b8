"""The Image aggregate's live events on their own (docs/adr/0028): attachments, block jobs as
operations, the phase a live stage reached, and aborts; and that the folded state keeps them."""

from __future__ import annotations

import uuid

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CommitStage, RebaseStage
from engine.errors import ClaimLost, ImageInUse, ImageNotReady, StaleFix, WrongImageKind
from engine.projections import folded_state
from tests.aggregates.test_image import NOW, disk, run_all, vol


def ready_disk() -> Image:
    """A disk whose work is all done, on a chain of three volumes."""
    image = disk()
    run_all(image)
    image.change_chain(chain=[vol(1), vol(2), vol(3)], reason="test", host_id="a", now=NOW)
    return image


def commit_job(op_id: str = "job") -> ops.OperationPlan:
    stage: CommitStage = {
        "do": "commit", "volume": vol(1), "top": vol(3), "set_chain": [vol(1)]
    }  # fmt: skip
    return ops.plan(op_id, ops.Purpose.COMMIT, stage)


def pull_job(op_id: str = "pull") -> ops.OperationPlan:
    stage: RebaseStage = {
        "do": "rebase", "volume": vol(3), "old_backing": vol(2), "set_chain": [vol(3)]
    }  # fmt: skip
    return ops.plan(op_id, ops.Purpose.PULL, stage)


def snapshot_image() -> Image:
    return Image.request(
        image_id=uuid.uuid4(), kind=ops.SNAPSHOT, size=512, chain=[vol(1)], user_data=None,
        strategy=ops.SPACE, auto_fix=True, origin={}, operations=[], host_id="a", now=NOW,
    )  # fmt: skip


# --- attachments ------------------------------------------------------------------------------


def test_attach_records_the_host_and_is_a_no_op_when_it_serves_the_image_already() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    image.attach(host_id="a", now=NOW)
    events = image.collect_events()
    assert [type(e).__name__ for e in events].count("ImageAttached") == 1
    assert image.attached_on == "a" and image.prepared_on == {"a"}


def test_attach_is_refused_while_another_host_has_the_image_attached_or_prepared() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    with pytest.raises(ImageInUse, match=r"\['a'\]"):
        image.attach(host_id="b", now=NOW)
    prepared = ready_disk()
    prepared.prepare(host_id="a", now=NOW)
    with pytest.raises(ImageInUse):
        prepared.attach(host_id="b", now=NOW)
    assert (image.attached_on, prepared.attached_on) == ("a", None)


def test_attach_is_refused_on_the_host_where_a_virtual_machine_opens_the_file_itself() -> None:
    image = ready_disk()
    image.prepare(host_id="a", now=NOW)
    with pytest.raises(ImageInUse, match="opens its file"):
        image.attach(host_id="a", now=NOW)
    assert image.attached_on is None


def test_release_attachment_frees_the_image_of_a_dead_host_for_another() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    image.release_attachment(of_host="a", reason="a is dead", host_id="b", now=NOW)
    assert image.attached_on is None and image.prepared_on == set()
    released = image.collect_events()[-1]
    assert isinstance(released, Image.AttachmentReleased)
    assert (released.of_host, released.reason, released.host_id) == ("a", "a is dead", "b")
    image.release_attachment(of_host="a", reason="again", host_id="b", now=NOW)  # no-op
    assert image.collect_events() == []
    image.attach(host_id="b", now=NOW)
    assert image.attached_on == "b"


def test_release_of_a_prepared_host_leaves_another_hosts_attachment_alone() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    image.release_attachment(of_host="c", reason="not there", host_id="b", now=NOW)
    assert image.attached_on == "a" and image.prepared_on == {"a"}


def test_tear_down_clears_the_attachment_and_only_for_the_host_that_has_it() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    image.tear_down(host_id="b", now=NOW)
    assert image.attached_on == "a"
    image.tear_down(host_id="a", now=NOW)
    assert image.attached_on is None and image.prepared_on == set()
    image.remove(host_id="a", now=NOW)  # no longer in use
    assert image.removed


def test_an_attached_image_cannot_be_removed() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    with pytest.raises(ImageInUse, match="attached"):
        image.remove(host_id="a", now=NOW)


def test_a_snapshot_is_taken_of_an_attached_disk_but_not_of_one_a_vm_opens_itself() -> None:
    attached = ready_disk()
    attached.attach(host_id="a", now=NOW)
    frozen = attached.take_snapshot(
        snapshot_id=uuid.uuid4(), new_top=vol(4), operations=[], host_id="a", now=NOW
    )
    assert frozen == [vol(1), vol(2), vol(3)] and attached.chain[-1] == vol(4)
    opened = ready_disk()
    opened.prepare(host_id="a", now=NOW)
    with pytest.raises(ImageInUse, match="attached"):
        opened.take_snapshot(snapshot_id=None, new_top=vol(4), operations=[], host_id="a", now=NOW)
    assert opened.chain == [vol(1), vol(2), vol(3)]


# --- block jobs as operations -----------------------------------------------------------------


def test_request_operation_queues_a_block_job_on_an_idle_disk() -> None:
    image = ready_disk()
    image.request_operation(operation=pull_job(), host_id="a", now=NOW)
    op = image.current_operation()
    assert op is not None and (op.op_id, op.purpose, op.state) == (
        "pull",
        ops.Purpose.PULL,
        ops.PENDING,
    )
    assert image.last_error is None


def test_request_operation_is_refused_while_other_work_is_unfinished() -> None:
    image = disk()  # its create has not run
    with pytest.raises(ImageNotReady, match="create"):
        image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    run_all(image)
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match="job"):
        image.request_operation(operation=pull_job(), host_id="a", now=NOW)
    held = disk(auto_fix=False)
    with pytest.raises(ImageNotReady, match="held"):
        held.request_operation(operation=pull_job(), host_id="a", now=NOW)


def test_request_operation_is_refused_on_a_snapshot() -> None:
    with pytest.raises(WrongImageKind):
        snapshot_image().request_operation(operation=pull_job(), host_id="a", now=NOW)


def test_reach_records_the_phase_only_under_the_claim_and_completion_clears_it() -> None:
    image = ready_disk()
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    with pytest.raises(ClaimLost):  # nobody claimed it
        image.reach(op_id="job", stage=0, epoch=1, phase="pivoting", host_id="a", now=NOW)
    epoch = image.claim(op_id="job", stage=0, host_id="a", now=NOW)
    with pytest.raises(ClaimLost):  # another host
        image.reach(op_id="job", stage=0, epoch=epoch, phase="pivoting", host_id="b", now=NOW)
    with pytest.raises(ClaimLost):  # an older claim
        image.reach(op_id="job", stage=0, epoch=epoch - 1, phase="pivoting", host_id="a", now=NOW)
    image.reach(op_id="job", stage=0, epoch=epoch, phase="pivoting", host_id="a", now=NOW)
    op = image.operation("job")
    assert op is not None and op.phase == "pivoting"
    image.complete(op_id="job", stage=0, epoch=epoch, host_id="a", now=NOW)
    assert op.phase == "" and op.state == ops.DONE and not op.aborted
    assert image.chain == [vol(1)]


def test_a_phase_survives_a_takeover_claim_for_the_host_that_finishes_the_stage() -> None:
    image = ready_disk()
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    epoch = image.claim(op_id="job", stage=0, host_id="a", now=NOW)
    image.reach(op_id="job", stage=0, epoch=epoch, phase="pivoting", host_id="a", now=NOW)
    image.claim(op_id="job", stage=0, host_id="b", now=NOW, take_over="a")
    op = image.operation("job")
    assert op is not None and op.phase == "pivoting" and op.claim_host == "b"


def test_abort_ends_the_job_with_the_chain_as_it_was() -> None:
    image = ready_disk()
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    image.claim(op_id="job", stage=0, host_id="a", now=NOW)
    image.abort_operation(op_id="job", reason="abort_block_job", host_id="b", now=NOW)
    op = image.operation("job")
    assert op is not None
    assert (op.state, op.aborted, op.claim_host, op.phase) == (ops.DONE, True, None, "")
    assert op.history[-1] == "aborted by b: abort_block_job"
    assert image.chain == [vol(1), vol(2), vol(3)]
    assert image.current_operation() is None
    image.request_operation(operation=pull_job(), host_id="a", now=NOW)  # the disk is idle


@pytest.mark.parametrize("which", ["unknown", "finished", "not-a-block-job"])
def test_abort_of_anything_but_an_unfinished_block_job_is_stale(which: str) -> None:
    image = ready_disk() if which != "not-a-block-job" else disk()
    op_id = {"unknown": "nope", "finished": "job", "not-a-block-job": "create"}[which]
    if which == "finished":
        image.request_operation(operation=commit_job(), host_id="a", now=NOW)
        run_all(image)
    version = image.version
    with pytest.raises(StaleFix, match=op_id):
        image.abort_operation(op_id=op_id, reason="x", host_id="a", now=NOW)
    assert image.version == version


def test_an_aborted_job_cannot_be_aborted_again() -> None:
    image = ready_disk()
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    image.abort_operation(op_id="job", reason="", host_id="a", now=NOW)
    op = image.operation("job")
    assert op is not None and op.history[-1] == "aborted by a: no reason given"
    with pytest.raises(StaleFix):
        image.abort_operation(op_id="job", reason="", host_id="a", now=NOW)


# --- replays and the folded state -------------------------------------------------------------


def live_history() -> Image:
    """A disk attached on ``a``, a commit whose pivot was asked for, an aborted pull before."""
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    image.request_operation(operation=pull_job(), host_id="a", now=NOW)
    image.abort_operation(op_id="pull", reason="changed my mind", host_id="a", now=NOW)
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    epoch = image.claim(op_id="job", stage=0, host_id="a", now=NOW)
    image.reach(op_id="job", stage=0, epoch=epoch, phase="pivoting", host_id="a", now=NOW)
    return image


def live_fields(image: Image) -> tuple[object, ...]:
    return (
        image.attached_on,
        sorted(image.prepared_on),
        image.version,
        [(o.op_id, o.state, o.phase, o.aborted, o.claim_host, o.history) for o in image.operations],
    )


def test_replaying_the_live_events_gives_the_same_image() -> None:
    image = live_history()
    replayed = Image.project(None, image.collect_events())
    assert replayed is not None
    assert live_fields(replayed) == live_fields(image)
    assert replayed.attached_on == "a"
    assert [(o.phase, o.aborted) for o in replayed.operations[-2:]] == [
        ("", True), ("pivoting", False)
    ]  # fmt: skip


def test_the_folded_state_round_trips_attachment_phase_and_abort() -> None:
    image = live_history()
    image.collect_events()
    decoded, worker = folded_state.decode(folded_state.encode(image, "a"))
    assert worker == "a"
    assert live_fields(decoded) == live_fields(image)
    twin = folded_state.clone(image)
    assert live_fields(twin) == live_fields(image)


def test_a_clone_is_not_changed_by_live_events_applied_to_the_original() -> None:
    image = live_history()
    image.collect_events()
    twin = folded_state.clone(image)
    before = live_fields(twin)
    op = image.operation("job")
    assert op is not None
    image.complete(op_id="job", stage=0, epoch=op.claim_epoch, host_id="a", now=NOW)
    image.release_attachment(of_host="a", reason="dead", host_id="b", now=NOW)
    assert live_fields(twin) == before
    assert twin.attached_on == "a" and twin.operations[-1].phase == "pivoting"
    assert image.attached_on is None and image.operations[-1].phase == ""


def test_a_snapshot_is_refused_while_a_block_job_is_unfinished() -> None:
    """A block job's completion sets the chain it planned: a snapshot taken meanwhile would
    lose the disk's new top, and the disk would write into a volume the snapshot reads."""
    image = ready_disk()
    image.request_operation(operation=commit_job(), host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match="block job job"):
        image.take_snapshot(
            snapshot_id=uuid.uuid4(), new_top=vol(4), operations=[], host_id="a", now=NOW
        )
    assert image.chain == [vol(1), vol(2), vol(3)]
    run_all(image)
    image.take_snapshot(
        snapshot_id=uuid.uuid4(), new_top=vol(4), operations=[], host_id="a", now=NOW
    )
    assert image.chain == [vol(1), vol(4)]
