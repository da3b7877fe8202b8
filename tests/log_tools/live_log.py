"""A log of live work for the strata-log tests: a real engine's block jobs (run offline), an
attach and a detach, an aborted job; then what only a host that dies mid-pivot leaves, appended
through the image service: a stage that reached ``pivoting`` and the attachment another host
released (docs/adr/0028)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

from engine import StorageEngine
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CommitStage
from engine.formats.qemu.storage_daemon import StorageDaemon
from tests.executors.executor_repos import Repo

MiB = 2**20
REPO = "r1"


@dataclass(frozen=True)
class LiveLog:
    repo: str
    disk: str  # the disk all the live events are of
    # The block jobs' operations, by the start of their ids (what a job's id keeps of them).
    committed: str  # the offline intermediate commit
    pulled: str  # the offline partial pull
    aborted: str  # the commit aborted before it ran
    pivoting: str  # the active commit left at "pivoting": its whole op id


def chain_of(se: StorageEngine, disk: str) -> list[str]:
    return [v.volume_id for v in se.get_volume_chain(REPO, disk)]


def op_id(job: str) -> str:
    """The start of a block job's operation id (``j<24 of its characters>-<stage>``,
    engine/service/attachments.py)."""
    return job[1:].rsplit("-", 1)[0]


def make_live_log(root: str) -> LiveLog:
    repo = os.path.join(root, "repo")
    os.mkdir(repo)
    params = {"path": repo}
    state_dir = tempfile.mkdtemp(prefix="s", dir="/tmp")  # a daemon's socket path is short
    try:
        with StorageEngine("host-a", state_dir=state_dir, poll_interval=0.1) as se:
            se.create_storage_repository("localfs-1.0", params)
            se.connect_storage_repository(REPO, "localfs-1.0", params)
            disk = se.create_virtual_disk(REPO, 4 * MiB)
            se.wait_for_image(REPO, disk, timeout=30)
            for _ in range(3):
                se.remove_image(REPO, se.create_snapshot(REPO, disk))
                se.wait_for_image(REPO, disk, timeout=30)
            base, middle, _, _ = chain_of(se, disk)
            committed = op_id(se.block_commit(REPO, disk, middle, base))
            se.wait_for_image(REPO, disk, timeout=30)
            pulled = op_id(se.block_pull(REPO, disk, base_volume_id=base))
            se.wait_for_image(REPO, disk, timeout=30)
            se.attach_image(REPO, disk)
            se.detach_image(REPO, disk)
    finally:
        try:
            StorageDaemon(state_dir).stop()
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
    with StorageEngine("host-b", state_dir=os.path.join(root, "b"), run_executors=False) as se:
        se.connect_storage_repository(REPO, "localfs-1.0", params)
        base, top = chain_of(se, disk)
        aborted = op_id(se.block_commit(REPO, disk, top, base))
        se.abort_block_job(REPO, disk)
    pivoting = dead_mid_pivot(repo, uuid.UUID(disk))
    return LiveLog(repo, disk, committed, pulled, aborted, pivoting)


def dead_mid_pivot(path: str, disk: uuid.UUID) -> str:
    """host-c attaches the disk, starts an active commit and asks for the pivot; host-d finds
    host-c dead and releases its attachment (what the scheduler appends with its claim)."""
    on_c, on_d = Repo(path, "host-c", create=False), Repo(path, "host-d", create=False)
    try:
        chain = on_c.service.get(disk).chain
        stage: CommitStage = {
            "do": "commit", "volume": chain[0], "top": chain[-1], "set_chain": [chain[0]]
        }  # fmt: skip
        job = ops.plan(uuid.uuid4().hex, ops.Purpose.COMMIT, stage)

        def pivot(image: Image) -> None:
            now = on_c.service.now()
            image.attach(host_id="host-c", now=now)
            image.request_operation(operation=job, host_id="host-c", now=now)
            epoch = image.claim(op_id=job["op_id"], stage=0, host_id="host-c", now=now)
            image.reach(
                op_id=job["op_id"], stage=0, epoch=epoch, phase="pivoting", host_id="host-c",
                now=now,
            )  # fmt: skip

        on_c.service.update(disk, pivot)
        on_d.service.update(
            disk,
            lambda i: i.release_attachment(
                of_host="host-c",
                reason="host host-c is dead (its heartbeat expired), its daemon too",
                host_id="host-d",
                now=on_d.service.now(),
            ),
        )
        return job["op_id"]
    finally:
        on_c.close()
        on_d.close()
