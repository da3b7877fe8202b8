"""A migration's stages offline (docs/adr/0029) on real files with the real qemu-img: the
clone, the checked sync, the switch that copies the top when the source holds every write, and
the rule for a switch that a dead host asked for and nobody saw end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CloneStage, Stage, SwitchStage, SyncStage
from engine.executors import migration_stages, replica_files
from engine.executors.stage_run import StageRun, Volume
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.repository.driver import RepositoryStorage
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu

KiB = 1024


class Destination:
    """``repo2`` as a migration's stage reaches it (engine/host_repositories.OtherRepository)."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo

    @property
    def storage(self) -> RepositoryStorage:
        return self.repo.storage

    def image(self, image_id: uuid.UUID, /) -> Image | None:
        service = self.repo.service
        return service.get(image_id) if service.exists(image_id) else None

    def update(
        self, image_id: uuid.UUID, command: Callable[[Image, str, datetime], object], /
    ) -> None:
        service = self.repo.service
        service.update(image_id, lambda image: command(image, service.host_id, service.now()))


def two_volumes(repo: Repo) -> tuple[str, str]:
    """base (a MiB of 0x11 at 0) <- top (a MiB of 0x22 at 1 MiB), 4 MiB."""
    base, top = new_volume("qcow2"), new_volume("qcow2")
    qemu.create(repo.path(base), "qcow2", 4 * MiB)
    qemu.write_pattern(repo.path(base), "qcow2", 0, MiB, 0x11)
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(top), "qcow2", MiB, MiB, 0x22)
    return base, top


def migrating(repo: Repo, repo2: Repo, chain: list[str], *stages: Stage) -> uuid.UUID:
    """A disk on ``chain`` in ``repo`` being migrated to ``repo2`` by ``stages``, with its
    replica requested there."""
    disk = uuid.uuid4()
    origin = {"how": "replica", "of": repo.storage.root, "repository": "r1", "op": "mig"}
    replica = Image.request(
        image_id=disk, kind=ops.VIRTUAL_DISK, size=4 * MiB, chain=chain, user_data=None,
        strategy=ops.SPACE, auto_fix=True, origin=origin, operations=[],
        host_id=repo2.host_id, now=repo2.service.now(),
    )  # fmt: skip
    repo2.service.add(replica)
    repo.request(chain=chain, image_id=disk)
    repo.service.update(
        disk,
        lambda image: image.start_replication(
            target=repo2.storage.root,
            operation=ops.plan("mig", ops.Purpose.MIGRATE, *stages),
            host_id=repo.host_id,
            now=repo.service.now(),
        ),
    )
    return disk


def test_an_offline_migration_clones_syncs_and_switches_and_removes_the_source(
    repo: Repo, repo2: Repo
) -> None:
    base, top = two_volumes(repo)
    target = repo2.storage.root
    clone: CloneStage = {
        "do": "clone", "target": target, "volumes": [[base, 4 * MiB, None], [top, 4 * MiB, base]]
    }  # fmt: skip
    sync: SyncStage = {"do": "sync", "target": target, "volumes": [base, top]}
    switch: SwitchStage = {"do": "switch", "target": target, "volume": top}
    disk = migrating(repo, repo2, [base, top], clone, sync, switch)
    executor = repo.executor(repository_at=lambda root: Destination(repo2))

    assert executor.run_once() == 3

    assert qemu.compare(repo.path(top), repo2.path(top))
    info = qemu.info(repo2.path(top), fmt="qcow2")
    assert info["backing-filename"] == base  # the source's relative name, right here too
    assert repo.service.get(disk).removed
    replica = repo2.service.get(disk)
    assert replica.replica_of is None and not replica.removed and replica.chain == [base, top]
    assert [f for f in os.listdir(os.path.dirname(repo2.path(base))) if f.startswith(".")] == []


def test_a_sync_run_again_copies_nothing_and_a_copy_that_differs_is_refused(
    repo: Repo, repo2: Repo
) -> None:
    base, top = two_volumes(repo)
    target = repo2.storage.root
    clone: CloneStage = {"do": "clone", "target": target, "volumes": [[base, 4 * MiB, None]]}
    sync: SyncStage = {"do": "sync", "target": target, "volumes": [base]}
    migrating(repo, repo2, [base, top], clone, sync, {**sync})
    executor = repo.executor(repository_at=lambda root: Destination(repo2))
    assert executor.run_once() == 3
    synced = os.stat(repo2.path(base)).st_ino
    run = StageRun(uuid.uuid4(), "op", 0, 1, sync, repo.storage, qemu, repo.find_image)
    replica_files.copy_volume(
        run, repo2.storage, Volume(base, *ops.split_ref(base), repo.path(base))
    )
    assert os.stat(repo2.path(base)).st_ino == synced  # it reads the same: left as it is

    # A copy that does not read like its source (the source changed under it) is not used.
    source = Volume(top, *ops.split_ref(top), repo.path(top))
    qemu.create(repo2.path(top), "qcow2", 4 * MiB)

    class Changing(QemuImg):
        def compare_volumes(self, a: str, b: str, fmt: str, **kw: float | None) -> bool:
            if ".tmp-" in b:
                qemu.write_pattern(a, fmt, 3 * MiB, 64 * KiB, 0x99)
            return super().compare_volumes(a, b, fmt)

    changing = StageRun(uuid.uuid4(), "op", 0, 1, sync, repo.storage, Changing(), repo.find_image)
    try:
        replica_files.copy_volume(changing, repo2.storage, source)
    except Exception as e:
        assert type(e).__name__ == "VolumeMismatch"
    else:
        raise AssertionError("a copy that differs from its source was put in place")


def test_a_switch_nobody_saw_end_keeps_every_write_of_either_side(repo: Repo, repo2: Repo) -> None:
    """The source's top has a write whose allocation the replica's top never flushed (1 MiB),
    the replica's top a write made after the switch (3 MiB): afterwards the replica reads
    both, and what they both had (2 MiB)."""
    base, top = two_volumes(repo)
    # The replica: base copied, its top with the writes both sides had, minus the one whose
    # metadata was lost, plus the one after the switch.
    with open(repo.path(base), "rb") as src, open(repo2.path(base), "wb") as dst:
        dst.write(src.read())
    qemu.create(repo2.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    for path in (repo.path(top), repo2.path(top)):
        qemu.write_pattern(path, "qcow2", 2 * MiB, MiB, 0x33)  # before the switch, both
    qemu.write_pattern(repo2.path(top), "qcow2", 3 * MiB, MiB, 0x44)  # after it, replica only
    switch: SwitchStage = {"do": "switch", "target": repo2.storage.root, "volume": top}
    run = StageRun(
        uuid.uuid4(), "mig", 0, 1, switch, repo.storage, qemu, repo.find_image,
        phase=migration_stages.SWITCH_REQUESTED,
    )  # fmt: skip
    source = Volume(top, *ops.split_ref(top), repo.path(top))

    replica_files.settle(run, repo2.storage, source)

    replica = repo2.path(top)
    for offset, pattern in ((0, 0x11), (MiB, 0x22), (2 * MiB, 0x33), (3 * MiB, 0x44)):
        assert qemu.read_pattern_matches(replica, "qcow2", offset, MiB, pattern), offset
    assert qemu.info(replica, fmt="qcow2")["backing-filename"] == base
    assert [f for f in os.listdir(os.path.dirname(repo2.path(base))) if f.startswith(".")] == []


def test_a_switch_nobody_saw_end_keeps_the_replica_when_both_read_the_same(
    repo: Repo, repo2: Repo
) -> None:
    base, top = two_volumes(repo)
    for ref in (base, top):
        with open(repo.path(ref), "rb") as src, open(repo2.path(ref), "wb") as dst:
            dst.write(src.read())
    before = os.stat(repo2.path(top)).st_ino
    switch: SwitchStage = {"do": "switch", "target": repo2.storage.root, "volume": top}
    run = StageRun(uuid.uuid4(), "mig", 0, 1, switch, repo.storage, qemu, repo.find_image)

    replica_files.settle(run, repo2.storage, Volume(top, *ops.split_ref(top), repo.path(top)))

    assert os.stat(repo2.path(top)).st_ino == before
