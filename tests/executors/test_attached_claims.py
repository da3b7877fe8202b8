"""Which stages of an attached image an executor claims (docs/adr/0028): only the attaching host
claims them, unless that host may be taken over; and then the attachment is released with the
claim. A stage with no live form waits for the detach on the attaching host."""

from __future__ import annotations

import uuid

from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import CopyStage, RebaseStage, has_live_form
from tests.executors.executor_repos import HOST, MiB, Repo, new_volume, qemu

OTHER = "host-b"


class Hosts:
    """What the executor knows of other hosts: ``dead`` ones may be taken over."""

    def __init__(self, *dead: str) -> None:
        self.dead = set(dead)

    def may_take_over(self, host_id: str, /) -> bool:
        return host_id in self.dead

    def expires_in(self, host_id: str, /) -> float:
        return 0.0 if host_id in self.dead else 60.0


def pull_on_two_volumes(repo: Repo) -> tuple[uuid.UUID, str, str]:
    """A disk on base <- top whose one operation, a block job, pulls the base into the top."""
    base, top = new_volume("qcow2"), new_volume("qcow2")
    qemu.create(repo.path(base), "qcow2", 4 * MiB)
    qemu.write_pattern(repo.path(base), "qcow2", 0, MiB, 0xA1)
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    stage: RebaseStage = {"do": "rebase", "volume": top, "old_backing": base, "set_chain": [top]}
    disk = repo.request(stage, chain=[base, top], purpose=ops.Purpose.PULL)
    return disk, base, top


def attach(repo: Repo, disk: uuid.UUID, host_id: str) -> None:
    repo.service.update(disk, lambda i: i.attach(host_id=host_id, now=i.modified_on))


def test_the_work_of_an_image_attached_on_a_live_host_is_left_to_that_host(repo: Repo) -> None:
    disk, base, top = pull_on_two_volumes(repo)
    attach(repo, disk, OTHER)

    assert repo.executor(hosts=Hosts()).run_once() == 0
    assert repo.executor().run_once() == 0  # without knowing the hosts: never taken over

    assert repo.topics(disk) == ["ImageRequested", "ImageAttached"]
    assert qemu.info(repo.path(top), fmt="qcow2")["backing-filename"] == base


def test_the_work_of_an_image_attached_on_a_dead_host_is_claimed_with_the_release(
    repo: Repo,
) -> None:
    disk, _, top = pull_on_two_volumes(repo)
    attach(repo, disk, OTHER)

    assert repo.executor(hosts=Hosts(OTHER)).run_once() == 1

    topics = repo.topics(disk)
    assert topics[:4] == ["ImageRequested", "ImageAttached", "AttachmentReleased", "StageClaimed"]
    assert topics[-1] == "StageCompleted"
    records = [r for r in repo.app.operation_log.read() if r.originator_id == disk]
    released, claimed = records[2], records[3]
    assert released.topic.endswith(".AttachmentReleased") and not released.txn_last
    assert claimed.topic.endswith(".StageClaimed") and claimed.txn_last  # one transaction
    assert released.host_id == HOST
    image = repo.service.get(disk)
    assert image.attached_on is None and image.prepared_on == set()
    assert image.chain == [top]
    assert "backing-filename" not in qemu.info(repo.path(top), fmt="qcow2")  # run offline
    assert qemu.read_pattern_matches(repo.path(top), "qcow2", 0, MiB, 0xA1)


def test_a_stage_with_no_live_form_waits_on_the_attaching_host_until_the_detach(
    repo: Repo,
) -> None:
    # A performance disk's optimize after a snapshot: a copy that flattens the chain
    # (engine/planning.py optimize_plan), which would change what the daemon serves.
    base, top, flat = new_volume("qcow2"), new_volume("qcow2"), new_volume("raw")
    qemu.create(repo.path(base), "qcow2", 4 * MiB)
    qemu.write_pattern(repo.path(base), "qcow2", 0, MiB, 0xA1)
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    disk = uuid.uuid4()
    stage: CopyStage = {
        "do": "copy", "source_image": str(disk), "volume": flat, "set_chain": [flat]
    }  # fmt: skip
    assert not has_live_form(stage)
    repo.request(stage, chain=[base, top], purpose=ops.OPTIMIZE, image_id=disk)
    attach(repo, disk, HOST)
    executor = repo.executor(hosts=Hosts())

    assert executor.run_once() == 0

    assert repo.topics(disk) == ["ImageRequested", "ImageAttached"]
    repo.service.update(disk, lambda i: i.tear_down(host_id=HOST, now=i.modified_on))
    assert executor.run_once() == 1
    assert repo.service.get(disk).chain == [flat]
    assert qemu.compare(repo.path(top), repo.path(flat), a_fmt="qcow2", b_fmt="raw")


def test_which_stages_have_a_live_form() -> None:
    volume, backing = new_volume("qcow2"), new_volume("qcow2")
    assert has_live_form({"do": "rebase", "volume": volume})
    assert has_live_form({"do": "commit", "volume": backing, "top": volume})
    assert has_live_form({"do": "create", "volume": volume, "backing": backing})
    assert not has_live_form({"do": "create", "volume": volume, "size": MiB})
    assert not has_live_form({"do": "resize", "volume": volume, "size": MiB})
    assert not has_live_form({"do": "delete", "volumes": [volume]})


def test_a_merge_stage_that_changes_a_volume_of_an_image_attached_elsewhere_waits(
    repo: Repo,
) -> None:
    """A merge is queued on one user of the merged volume (an attached one if there was one
    then) and rewrites the other users' volumes too; a user attached on another host since is
    served by that host's daemon, so the stage that changes its volume is left until it is
    detached (or its host dies), like the work of the attached image itself."""
    base, merged, mine, theirs = (new_volume("qcow2") for _ in range(4))
    qemu.create(repo.path(base), "qcow2", 4 * MiB)
    qemu.create(repo.path(merged), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(merged), "qcow2", MiB, MiB, 0xB2)
    for ref in (mine, theirs):
        qemu.create(repo.path(ref), "qcow2", None, backing=merged, backing_fmt="qcow2")
    other = repo.request(chain=[base, merged, theirs])
    first: RebaseStage = {"do": "rebase", "volume": theirs, "backing": base, "old_backing": merged}
    last: RebaseStage = {
        "do": "rebase", "volume": mine, "backing": base, "old_backing": merged,
        "set_chain": [base, mine], "drop_volume": merged,
        "chain_changes": {str(other): [base, theirs]},
    }  # fmt: skip
    carrier = repo.request(first, last, chain=[base, merged, mine], purpose=ops.MERGE)
    attach(repo, other, OTHER)

    assert repo.executor(hosts=Hosts()).run_once() == 0

    assert repo.topics(carrier) == ["ImageRequested"]
    assert qemu.info(repo.path(theirs), fmt="qcow2")["backing-filename"] == merged

    assert repo.executor(hosts=Hosts(OTHER)).run_once() == 2  # its host died with its daemon
    assert repo.service.get(other).chain == [base, theirs]
    assert qemu.read_pattern_matches(repo.path(theirs), "qcow2", MiB, MiB, 0xB2)
