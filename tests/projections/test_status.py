"""An image's status, stage, progress, host and error, as get_image_status reports them, folded
from the log alone (plus the volumes a check found lost)."""

from __future__ import annotations

import uuid

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CreateStage
from engine.projections.status import image_status
from engine.types import ImageStatus
from tests.projections.projection_log import GiB, Repo, new_op_id, new_ref


def status_of(repo: Repo, image_id: uuid.UUID, lost: tuple[str, ...] = ()) -> ImageStatus:
    view = repo.view()
    image = view.image(image_id)
    assert image is not None
    return image_status(image, view, lost)


def test_a_disk_whose_volume_is_not_made_yet_is_broken_with_no_progress(repo: Repo) -> None:
    disk = repo.disk()
    status = status_of(repo, disk)
    assert (status.status, status.stage, status.percent_complete) == ("broken", "1/1", -1)
    assert status.host_id == "host-a"  # nobody worked on it yet: the host that asked for it
    assert status.last_error is None


def test_a_disk_whose_work_is_done_is_optimized_at_100_percent(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    status = status_of(repo, disk)
    assert (status.status, status.stage, status.percent_complete) == ("optimized", "1/1", 100)


def test_the_host_that_runs_a_stage_and_its_progress_are_reported(repo: Repo) -> None:
    disk = repo.disk()
    repo.claim(disk, "host-b")
    repo.progress(disk, 40, "host-b")
    status = status_of(repo, disk)
    assert (status.status, status.host_id, status.percent_complete) == ("broken", "host-b", 40)


def test_a_failed_stage_makes_the_image_broken_and_says_why(repo: Repo) -> None:
    disk = repo.disk()
    repo.fail(disk, "No space left on device", "host-c")
    status = status_of(repo, disk)
    assert (status.status, status.stage, status.host_id) == ("broken", "1/1", "host-c")
    assert status.last_error is not None and "No space left on device" in status.last_error


def test_a_stopped_operation_makes_the_image_broken_and_says_it_was_stopped(repo: Repo) -> None:
    disk = repo.disk()
    repo.stop(disk, "host overloaded")
    status = status_of(repo, disk)
    assert status.status == "broken"
    assert status.last_error is not None and "host overloaded" in status.last_error


def test_an_image_made_with_auto_fix_off_stays_broken_until_a_fix(repo: Repo) -> None:
    disk = repo.disk(auto_fix=False)
    assert status_of(repo, disk).status == "broken"
    op = repo.get(disk).current_operation()
    assert op is not None
    repo.request_fix(disk, ops.MEND, op.op_id, None)
    repo.run(disk)
    assert status_of(repo, disk).status == "optimized"


def test_a_performance_disk_is_degraded_until_its_optimize_operation_ran(repo: Repo) -> None:
    disk = repo.disk(strategy=ops.PERFORMANCE)
    repo.run(disk, stop_before=ops.OPTIMIZE)
    status = status_of(repo, disk)
    assert (status.status, status.stage, status.percent_complete) == ("degraded", "1/1", -1)
    repo.run(disk)
    assert status_of(repo, disk).status == "optimized"
    assert repo.get(disk).chain[0].endswith(".raw")


def test_a_held_or_stopped_optimize_leaves_the_image_usable_so_degraded(repo: Repo) -> None:
    held = repo.disk(strategy=ops.PERFORMANCE, auto_fix=False)
    create = repo.get(held).operations[0]
    repo.request_fix(held, ops.MEND, create.op_id, None)
    repo.run(held)
    assert status_of(repo, held).status == "degraded"  # the optimize is still held

    stopped = repo.disk(strategy=ops.PERFORMANCE)
    repo.run(stopped, stop_before=ops.OPTIMIZE)
    repo.stop(stopped, "not now")
    status = status_of(repo, stopped)
    assert status.status == "degraded"
    assert status.last_error is not None and "not now" in status.last_error


def test_a_performance_disk_made_of_overlays_is_degraded_even_with_nothing_queued(
    repo: Repo,
) -> None:
    disk = repo.disk(strategy=ops.PERFORMANCE)
    repo.run(disk)
    repo.snapshot(disk)  # this test's planner queues no optimize after a snapshot
    repo.run(disk)
    assert len(repo.get(disk).chain) == 2
    assert status_of(repo, disk).status == "degraded"


def test_a_disk_on_a_snapshot_still_being_made_elsewhere_is_broken_until_it_is(
    repo: Repo,
) -> None:
    source = repo.disk()
    repo.run(source)
    snap = repo.snapshot(source)
    clone = repo.disk(base=snap)
    repo.run(clone)  # the clone's own overlay is made; the source's new top is not
    assert status_of(repo, clone).status == "optimized"  # the snapshot's volumes are in place

    copy_id = repo.copied_snapshot()
    on_copy = repo.disk(base=copy_id)
    repo.run(on_copy)
    assert status_of(repo, on_copy).status == "broken"
    repo.run(copy_id)
    assert status_of(repo, on_copy).status == "optimized"


def test_a_lost_volume_makes_the_image_broken(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    [volume] = repo.get(disk).chain
    assert status_of(repo, disk, lost=(volume,)).status == "broken"


def test_an_image_with_no_operation_reports_stage_0_of_0_and_no_progress(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    snap = repo.snapshot(disk)
    status = status_of(repo, snap)
    assert (status.status, status.stage, status.percent_complete) == ("optimized", "0/0", -1)


def test_the_next_stage_shows_no_progress_until_it_is_claimed(repo: Repo) -> None:
    image_id = uuid.uuid4()
    first, second = new_ref(), new_ref()
    stages: list[CreateStage] = [
        {"do": "create", "volume": first, "size": GiB},
        {"do": "create", "volume": second, "size": GiB, "backing": first},
    ]
    repo.service.add(
        Image.request(
            image_id=image_id,
            kind=ops.VIRTUAL_DISK,
            size=GiB,
            chain=[first, second],
            user_data=None,
            strategy=ops.SPACE,
            auto_fix=True,
            origin={},
            operations=[ops.plan(new_op_id(), "create", *stages)],
            host_id="host-a",
            now=repo.clock(),
        )
    )
    repo.complete(image_id)
    status = status_of(repo, image_id)
    assert (status.status, status.stage, status.percent_complete) == ("broken", "2/2", -1)
    repo.claim(image_id)
    repo.progress(image_id, 7)
    assert status_of(repo, image_id).percent_complete == 7
