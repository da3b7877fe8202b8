"""Helpers for executor tests: real localfs repositories, images requested by hand with
hand-written operation plans, and executors over them (also used by crash_host.py)."""

from __future__ import annotations

import uuid
from typing import Any

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import plan, split_ref, volume_ref
from engine.aggregates.stage_kinds import Stage
from engine.application import LogConfig, StrataLogApplication
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.executors.scheduler import Executor
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.repository.driver import RepositoryStorage
from engine.formats.repository.registry import get_format
from engine.projections.view import RepositoryView
from engine.service.unit_of_work import ImageService

MiB = 2**20
HOST = "host-a"
qemu = QemuImg()


class Repo:
    """One repository as one host sees it."""

    def __init__(self, path: str, host_id: str = HOST, *, create: bool = True) -> None:
        if create:
            get_format("localfs-1.0").create({"path": path}, host_id)
        self.storage: RepositoryStorage = get_format("localfs-1.0").open({"path": path})
        self.app = StrataLogApplication(LogConfig(log_dir=self.storage.log_dir, host_id=host_id))
        self.host_id = host_id
        self.service = ImageService(self.app, host_id)
        self.view = RepositoryView(self.app)
        self.others: list[Repo] = []

    def close(self) -> None:
        self.view.close()
        self.app.close()

    def find_image(self, image_id: uuid.UUID) -> tuple[Image, RepositoryStorage] | None:
        for repo in (self, *self.others):
            if repo.service.exists(image_id):
                return repo.service.get(image_id), repo.storage
        return None

    def executor(
        self, *, qemu_img: QemuImg = qemu, crashpoints: CrashPoints = DISARMED, **options: Any
    ) -> Executor:
        return Executor(
            self.service,
            self.view,
            self.storage,
            qemu_img,
            host_id=self.host_id,
            find_image=self.find_image,
            crashpoints=crashpoints,
            **options,
        )

    def path(self, ref: str) -> str:
        return self.storage.volume_path(*split_ref(ref))

    def request(
        self,
        *stages: Stage,
        chain: list[str],
        size: int = 4 * MiB,
        kind: str = ops.VIRTUAL_DISK,
        auto_fix: bool = True,
        purpose: str = "create",
        image_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """An image whose one operation is ``stages`` (none: an image with no work)."""
        image_id = image_id or uuid.uuid4()
        operations = [plan(uuid.uuid4().hex, purpose, *stages)] if stages else []
        image = Image.request(
            image_id=image_id,
            kind=kind,
            size=size,
            chain=chain,
            user_data=None,
            strategy=ops.SPACE,
            auto_fix=auto_fix,
            origin={"test": "yes"},
            operations=operations,
            host_id=self.host_id,
            now=self.service.now(),
        )
        self.service.add(image)
        return image_id

    def topics(self, image_id: uuid.UUID) -> list[str]:
        """The short names of the image's events, in log order."""
        log = self.app.operation_log
        log.refresh()
        return [
            r.topic.rsplit(".", 1)[-1] for r in log.read() if str(r.originator_id) == str(image_id)
        ]

    def temporaries(self) -> list[str]:
        return [f.path for f in self.storage.list_volume_files() if f.is_temporary]


def new_volume(fmt: str) -> str:
    return volume_ref(uuid.uuid4().hex, fmt)


def snapshot_with_data(
    repo: Repo, size: int = 4 * MiB, pattern: int = 0x5A
) -> tuple[uuid.UUID, str]:
    """A ready snapshot whose one qcow2 volume holds ``pattern`` in its first MiB."""
    ref = new_volume("qcow2")
    qemu.create(repo.path(ref), "qcow2", size)
    qemu.write_pattern(repo.path(ref), "qcow2", 0, MiB, pattern)
    return repo.request(chain=[ref], size=size, kind=ops.SNAPSHOT), ref
