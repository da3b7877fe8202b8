"""The Image aggregate's migration events on their own (docs/adr/0029): a replication started
and ended in the source, a replica requested, switched, discarded and renewed in the
destination, the guards while either runs, and that the folded state keeps them."""

from __future__ import annotations

import uuid

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CloneStage, SwitchStage
from engine.errors import ImageInUse, ImageNotFound, ImageNotReady, ReplicationError
from engine.projections import folded_state
from tests.aggregates.test_image import NOW, run_all, vol
from tests.aggregates.test_live_events import pull_job, ready_disk

DST = "/srv/r2"
SRC = "/srv/r1"


def migration(op_id: str = "mig") -> ops.OperationPlan:
    clone: CloneStage = {"do": "clone", "target": DST, "volumes": [[vol(1), 512, None]]}
    switch: SwitchStage = {"do": "switch", "target": DST, "volume": vol(3)}
    return ops.plan(op_id, ops.Purpose.MIGRATE, clone, switch)


def replica(image_id: uuid.UUID | None = None) -> Image:
    return Image.request(
        image_id=image_id or uuid.uuid4(), kind=ops.VIRTUAL_DISK, size=512,
        chain=[vol(1), vol(2), vol(3)], user_data=None, strategy=ops.SPACE, auto_fix=True,
        origin={"how": "replica", "of": SRC, "repository": "r1", "op": "mig"}, operations=[],
        host_id="a", now=NOW,
    )  # fmt: skip


def names(image: Image) -> list[str]:
    return [type(e).__name__ for e in image.collect_events()]


# --- the source ---------------------------------------------------------------------------------


def test_a_migration_starts_a_replication_and_its_switch_removes_the_image_here() -> None:
    image = ready_disk()
    image.attach(host_id="a", now=NOW)
    image.collect_events()
    image.start_replication(target=DST, operation=migration(), host_id="a", now=NOW)
    assert image.replicating_to == DST
    run_all(image)
    assert names(image)[:2] == ["ReplicationStarted", "OperationRequested"]
    assert image.removed and image.replicating_to is None
    # The daemon serves the replica now: this copy is no longer in use on the host.
    assert image.attached_on is None and image.prepared_on == set()


def test_completing_the_switch_records_the_end_and_the_removal_in_the_same_breath() -> None:
    image = ready_disk()
    image.start_replication(target=DST, operation=migration(), host_id="a", now=NOW)
    image.collect_events()
    run_all(image)
    assert names(image)[-3:] == ["StageCompleted", "ReplicationEnded", "ImageRemoved"]


def test_while_a_replication_runs_the_image_takes_no_other_change() -> None:
    image = ready_disk()
    image.start_replication(target=DST, operation=None, host_id="a", now=NOW)
    with pytest.raises(ReplicationError, match="runs already"):
        image.start_replication(target="/srv/r3", operation=None, host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match="being migrated"):
        image.take_snapshot(snapshot_id=None, new_top=vol(4), operations=[], host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match="being migrated"):
        image.request_operation(operation=pull_job(), host_id="a", now=NOW)
    with pytest.raises(ImageInUse, match="being migrated"):
        image.remove(host_id="a", now=NOW)


def test_a_migration_is_refused_while_other_work_is_unfinished_and_steps_need_a_replication() -> (
    None
):
    image = ready_disk()
    image.request_operation(operation=pull_job(), host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match=r"is pending"):
        image.start_replication(target=DST, operation=migration(), host_id="a", now=NOW)
    fresh = ready_disk()
    with pytest.raises(ReplicationError, match="no replication runs"):
        fresh.request_migration_step(operation=migration(), host_id="a", now=NOW)
    with pytest.raises(ReplicationError, match="no replication runs"):
        fresh.end_replication(outcome="aborted", host_id="a", now=NOW)


def test_an_abort_ends_the_replication_and_leaves_the_image() -> None:
    image = ready_disk()
    image.start_replication(target=DST, operation=migration(), host_id="a", now=NOW)
    image.abort_operation(op_id="mig", reason="replication aborted", host_id="a", now=NOW)
    image.end_replication(outcome="aborted", host_id="a", now=NOW)
    assert not image.removed and image.replicating_to is None
    assert image.current_operation() is None
    image.take_snapshot(snapshot_id=None, new_top=vol(4), operations=[], host_id="a", now=NOW)


# --- the destination ----------------------------------------------------------------------------


def test_a_replica_refuses_every_call_until_it_is_switched_to() -> None:
    image = replica()
    assert image.replica_of == SRC
    with pytest.raises(ImageNotReady, match="replica being filled"):
        image.attach(host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match="replica being filled"):
        image.set_user_data(user_data=1, host_id="a", now=NOW)
    with pytest.raises(ImageNotReady, match="replica being filled"):
        image.remove(host_id="a", now=NOW)


def test_the_switch_makes_the_replica_the_image_attached_where_it_ran_with_its_merge() -> None:
    image = replica()
    merge = ops.plan(
        "mig-merge", ops.Purpose.COMMIT,
        {"do": "commit", "volume": vol(2), "top": vol(3), "set_chain": [vol(1), vol(2)]},
    )  # fmt: skip
    assert image.switch_replica(attached=True, operations=[merge], host_id="b", now=NOW)
    assert not image.switch_replica(attached=True, operations=[merge], host_id="b", now=NOW)
    assert image.replica_of is None and image.attached_on == "b"
    run_all(image, "b")
    assert image.chain == [vol(1), vol(2)]
    image.set_user_data(user_data=1, host_id="b", now=NOW)  # an image like any other


def test_a_discarded_replica_is_removed_and_a_new_migration_renews_it() -> None:
    image = replica()
    image.discard_replica(reason="aborted", host_id="a", now=NOW)
    assert image.removed
    with pytest.raises(ImageNotFound):
        image.set_user_data(user_data=1, host_id="a", now=NOW)
    origin = {"how": "replica", "of": "/srv/r3", "repository": "r3", "op": "again"}
    image.renew_replica(
        size=1024, chain=[vol(5)], user_data=None, origin=origin, host_id="a", now=NOW
    )
    assert not image.removed and image.replica_of == "/srv/r3" and image.chain == [vol(5)]
    assert image.size == 1024


def test_a_live_image_is_not_renewed_as_a_replica() -> None:
    image = ready_disk()
    with pytest.raises(ReplicationError, match="holds an image of this id"):
        image.renew_replica(
            size=512, chain=[vol(1)], user_data=None, origin={}, host_id="a", now=NOW
        )


def test_the_folded_state_keeps_what_a_migration_recorded() -> None:
    source = ready_disk()
    source.start_replication(target=DST, operation=migration(), host_id="a", now=NOW)
    twin = folded_state.clone(source)
    assert twin.replicating_to == DST
    image = replica()
    assert folded_state.clone(image).replica_of == SRC
