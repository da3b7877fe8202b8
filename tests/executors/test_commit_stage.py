"""The offline ``commit`` stage (docs/adr/0028) on real files with the real qemu-img: an
intermediate commit, an active one, and how an active commit whose pivot was asked for by a host
that died is finished."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CommitStage
from engine.formats.qemu.image_tools import QemuImg
from tests.executors.executor_repos import HOST, Repo, new_volume, qemu
from tests.executors.test_stages import three_volume_chain


class CountingQemu(QemuImg):
    """The real qemu-img, counting its commits."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0
        self.rate_limits: list[int] = []

    def commit(self, path: str, **kwargs: Any) -> None:
        self.commits += 1
        self.rate_limits.append(kwargs.get("rate_limit", 0))
        super().commit(path, **kwargs)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def flat(repo: Repo, ref: str, into: Path) -> str:
    """What ``ref``'s chain reads, as a raw file."""
    path = str(into / f"{ref}.raw")
    qemu.convert(repo.path(ref), path, src_fmt="qcow2", dst_fmt="raw")
    return path


def commit_job(repo: Repo, chain: list[str], *stages: CommitStage) -> uuid.UUID:
    """A disk on ``chain`` whose one operation, a block job, is ``stages``."""
    return repo.request(*stages, chain=chain, purpose=ops.Purpose.COMMIT)


def test_an_intermediate_commit_points_the_child_at_the_base_and_a_rerun_does_nothing(
    repo: Repo, tmp_path: Path
) -> None:
    base, middle, top = three_volume_chain(repo)
    before = flat(repo, top, tmp_path)
    stage: CommitStage = {
        "do": "commit", "volume": base, "top": middle, "child": top, "set_chain": [base, top]
    }  # fmt: skip
    counting = CountingQemu()
    disk = commit_job(repo, [base, middle, top], stage, {**stage})  # again: nothing left to do

    assert repo.executor(qemu_img=counting).run_once() == 2

    assert counting.commits == 1
    assert repo.service.get(disk).chain == [base, top]
    assert qemu.info(repo.path(top), fmt="qcow2")["backing-filename"] == base  # relative
    assert qemu.compare(repo.path(top), before, a_fmt="qcow2", b_fmt="raw")
    # The base holds the middle's data now: it reads as the middle did.
    assert qemu.read_pattern_matches(repo.path(base), "qcow2", 1 * 2**20, 2**20, 0xB2)
    assert repo.topics(disk)[-1] == "StageCompleted"
    assert repo.temporaries() == []


def test_an_active_commit_writes_the_top_down_into_the_base(repo: Repo, tmp_path: Path) -> None:
    base, middle, top = three_volume_chain(repo)
    before = flat(repo, top, tmp_path)
    stage: CommitStage = {"do": "commit", "volume": base, "top": top, "set_chain": [base]}
    disk = commit_job(repo, [base, middle, top], stage)

    assert repo.executor().run_once() == 1

    assert repo.service.get(disk).chain == [base]
    assert "backing-filename" not in qemu.info(repo.path(base), fmt="qcow2")
    assert qemu.compare(repo.path(base), before, a_fmt="qcow2", b_fmt="raw")
    # -d: the top keeps its clusters, so a re-run after a crash reads the same data again.
    assert qemu.compare(repo.path(top), before, a_fmt="qcow2", b_fmt="raw")


def test_an_offline_commit_keeps_to_the_jobs_bandwidth(repo: Repo, tmp_path: Path) -> None:
    base, middle, top = three_volume_chain(repo)
    before = flat(repo, top, tmp_path)
    stage: CommitStage = {
        "do": "commit", "volume": base, "top": top, "set_chain": [base], "bandwidth": 64 * 2**20
    }  # fmt: skip
    commit_job(repo, [base, middle, top], stage)
    counting = CountingQemu()

    assert repo.executor(qemu_img=counting).run_once() == 1

    assert counting.rate_limits == [64 * 2**20]  # qemu-img commit -r
    assert qemu.compare(repo.path(base), before, a_fmt="qcow2", b_fmt="raw")


def pivoting(repo: Repo, disk: uuid.UUID) -> None:
    """The log as a host leaves it that asked for the pivot and died: claimed, and reached
    ``pivoting`` under its claim (here this host's, which no thread of this process runs)."""
    op_id = repo.service.get(disk).operations[0].op_id

    def reach(image: Image) -> None:
        epoch = image.claim(op_id=op_id, stage=0, host_id=HOST, now=image.modified_on)
        image.reach(
            op_id=op_id, stage=0, epoch=epoch, phase="pivoting", host_id=HOST,
            now=image.modified_on,
        )  # fmt: skip

    repo.service.update(disk, reach)
    assert repo.service.get(disk).operations[0].phase == "pivoting"


def two_volumes(repo: Repo) -> tuple[str, str]:
    base, top = new_volume("qcow2"), new_volume("qcow2")
    qemu.create(repo.path(base), "qcow2", 4 * 2**20)
    qemu.write_pattern(repo.path(base), "qcow2", 0, 2**20, 0xA1)
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(top), "qcow2", 2**20, 2**20, 0xC3)
    return base, top


def run_pivoting_unchanged(repo: Repo, disk: uuid.UUID, base: str, top: str) -> None:
    """Record that the pivot was asked for, run the stage offline: no qemu-img commit, and
    neither file changed."""
    pivoting(repo, disk)
    sums = (sha256(repo.path(base)), sha256(repo.path(top)))
    counting = CountingQemu()

    assert repo.executor(qemu_img=counting).run_once() == 1

    assert counting.commits == 0
    assert (sha256(repo.path(base)), sha256(repo.path(top))) == sums


def test_a_pivot_asked_for_where_top_and_base_read_the_same_completes_without_a_commit(
    repo: Repo,
) -> None:
    base, top = two_volumes(repo)
    qemu.commit(repo.path(top), fmt="qcow2", keep=True)  # the job had written it all down
    stage: CommitStage = {"do": "commit", "volume": base, "top": top, "set_chain": [base]}
    disk = commit_job(repo, [base, top], stage)
    run_pivoting_unchanged(repo, disk, base, top)
    image = repo.service.get(disk)
    assert image.chain == [base] and image.operations[0].state == ops.DONE
    assert image.operations[0].phase == ""


def test_a_pivot_asked_for_where_top_and_base_differ_fails_and_keeps_both(repo: Repo) -> None:
    base, top = two_volumes(repo)
    stage: CommitStage = {"do": "commit", "volume": base, "top": top, "set_chain": [base]}
    disk = commit_job(repo, [base, top], stage)
    run_pivoting_unchanged(repo, disk, base, top)
    image = repo.service.get(disk)
    op = image.operations[0]
    assert op.state == ops.FAILED and image.chain == [base, top]
    assert "died while switching onto the base" in (op.error or "")
    assert repo.path(top) in (op.error or "") and repo.path(base) in (op.error or "")
    assert repo.topics(disk)[-1] == "StageFailed"
    assert repo.executor().run_once() == 0  # a person chooses; nothing retries it
