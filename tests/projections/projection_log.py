"""A repository's log built through the image service, and a view of it, for projection tests.

:class:`Repo` plays the facade (planning operations the way ADR 0004 describes) and the
executors (claiming and completing stages), with no QEMU: the projections see only the log.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import CopyStage, CreateStage
from engine.application import LogConfig, StrataLogApplication
from engine.projections.view import RepositoryView
from engine.service.unit_of_work import ImageService

GiB = 2**30
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def new_ref(fmt: str = "qcow2") -> str:
    return ops.volume_ref(uuid.uuid4().hex, fmt)


def new_op_id() -> str:
    return uuid.uuid4().hex


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class Repo:
    def __init__(self, log_dir: Path, host_id: str = "host-a", *, create: bool = True) -> None:
        """A new repository's log, or with ``create=False`` another host on an existing one."""
        self.config = LogConfig(log_dir=str(log_dir), host_id=host_id, create=create)
        self.app = StrataLogApplication(self.config)
        if create:
            self.app.create_repository(format_name="localfs", format_version="1.0", created_at=T0)
        self.clock = Clock()
        self.service = ImageService(self.app, host_id, clock=self.clock)
        self.host_id = host_id

    def view(self, db_path: Path | None = None) -> RepositoryView:
        view = RepositoryView(self.app, db_path=None if db_path is None else str(db_path))
        view.catch_up()
        return view

    def get(self, image_id: uuid.UUID) -> Image:
        return self.service.get(image_id)

    # --- the facade's part --------------------------------------------------------------

    def disk(
        self,
        size: int = GiB,
        *,
        strategy: str = ops.SPACE,
        auto_fix: bool = True,
        base: uuid.UUID | None = None,
        user_data: Any = None,
    ) -> uuid.UUID:
        image_id = uuid.uuid4()
        top = new_ref()
        below = [] if base is None else self.get(base).chain
        create: CreateStage = {"do": "create", "volume": top, "size": size}
        if below:
            create["backing"] = below[-1]
        plans = [ops.plan(new_op_id(), "create", create)]
        if strategy == ops.PERFORMANCE:
            raw = new_ref("raw")
            copy: CopyStage = {
                "do": "copy",
                "source_image": str(image_id),
                "volume": raw,
                "preallocate": True,
                "set_chain": [raw],
            }
            plans.append(ops.plan(new_op_id(), ops.OPTIMIZE, copy))
        image = Image.request(
            image_id=image_id,
            kind=ops.VIRTUAL_DISK,
            size=size,
            chain=[*below, top],
            user_data=user_data,
            strategy=strategy,
            auto_fix=auto_fix,
            origin={"from": "blank" if base is None else str(base)},
            operations=plans,
            host_id=self.host_id,
            now=self.clock(),
        )
        self.service.add(image)
        return image_id

    def snapshot(self, disk_id: uuid.UUID) -> uuid.UUID:
        snapshot_id = uuid.uuid4()

        def command(images: list[Image]) -> Image:
            [disk] = images
            new_top = new_ref()
            stage: CreateStage = {"do": "create", "volume": new_top, "size": disk.size}
            stage["backing"] = disk.chain[-1]
            frozen = disk.take_snapshot(
                snapshot_id=snapshot_id,
                new_top=new_top,
                operations=[ops.plan(new_op_id(), "snapshot", stage)],
                host_id=self.host_id,
                now=self.clock(),
            )
            return Image.request(
                image_id=snapshot_id,
                kind=ops.SNAPSHOT,
                size=disk.size,
                chain=frozen,
                user_data=None,
                strategy=disk.strategy,
                auto_fix=True,
                origin={"snapshot_of": str(disk.id)},
                operations=[],
                host_id=self.host_id,
                now=self.clock(),
            )

        return self.service.update_many([disk_id], command, new=lambda image: [image]).id

    def copied_snapshot(self, size: int = GiB) -> uuid.UUID:
        """A snapshot whose only volume is still to be copied in (from another repository)."""
        image_id = uuid.uuid4()
        volume = new_ref()
        copy: CopyStage = {"do": "copy", "source_image": str(uuid.uuid4()), "volume": volume}
        image = Image.request(
            image_id=image_id,
            kind=ops.SNAPSHOT,
            size=size,
            chain=[volume],
            user_data=None,
            strategy=ops.SPACE,
            auto_fix=True,
            origin={"how": "copy"},
            operations=[ops.plan(new_op_id(), "copy", copy)],
            host_id=self.host_id,
            now=self.clock(),
        )
        self.service.add(image)
        return image_id

    def remove(self, image_id: uuid.UUID) -> None:
        self.service.update(image_id, lambda i: i.remove(host_id=self.host_id, now=self.clock()))

    def stop(self, image_id: uuid.UUID, reason: str = "") -> None:
        self.service.update(
            image_id, lambda i: i.stop(reason=reason, host_id=self.host_id, now=self.clock())
        )

    def prepare(self, image_id: uuid.UUID) -> None:
        self.service.update(image_id, lambda i: i.prepare(host_id=self.host_id, now=self.clock()))

    def request_fix(
        self, image_id: uuid.UUID, fix_type: str, op_id: str, operation: ops.OperationPlan | None
    ) -> bool:
        def command(image: Image) -> bool:
            return image.request_fix(
                fix_type=fix_type,
                op_id=op_id,
                operation=operation,
                host_id=self.host_id,
                now=self.clock(),
            )

        return self.service.update(image_id, command)

    # --- the executors' part ------------------------------------------------------------

    def claim(self, image_id: uuid.UUID, host_id: str | None = None) -> tuple[str, int, int]:
        host = host_id or self.host_id

        def command(image: Image) -> tuple[str, int, int]:
            op = image.current_operation()
            assert op is not None and op.state == ops.PENDING
            epoch = image.claim(op_id=op.op_id, stage=op.done, host_id=host, now=self.clock())
            return op.op_id, op.done, epoch

        return self.service.update(image_id, command)

    def progress(self, image_id: uuid.UUID, percent: int, host_id: str | None = None) -> None:
        host = host_id or self.host_id

        def command(image: Image) -> None:
            op = image.current_operation()
            assert op is not None
            image.progress(
                op_id=op.op_id,
                stage=op.done,
                epoch=op.claim_epoch,
                percent=percent,
                host_id=host,
                now=self.clock(),
            )

        self.service.update(image_id, command)

    def complete(self, image_id: uuid.UUID, host_id: str | None = None) -> None:
        """Claim and complete the next stage, recording other images' new chains with it as
        the executors do (engine/executors/progress.py)."""
        host = host_id or self.host_id
        op_id, index, epoch = self.claim(image_id, host)
        op = self.get(image_id).operation(op_id)
        assert op is not None
        changes = {uuid.UUID(k): v for k, v in op.stages[index].get("chain_changes", {}).items()}

        def command(images: list[Image]) -> None:
            now = self.clock()
            images[0].complete(op_id=op_id, stage=index, epoch=epoch, host_id=host, now=now)
            for other in images[1:]:
                other.change_chain(chain=changes[other.id], reason="merge", host_id=host, now=now)

        self.service.update_many([image_id, *changes], command)

    def fail(self, image_id: uuid.UUID, error: str, host_id: str | None = None) -> None:
        host = host_id or self.host_id
        op_id, stage, epoch = self.claim(image_id, host)
        self.service.update(
            image_id,
            lambda i: i.fail(
                op_id=op_id, stage=stage, epoch=epoch, error=error, host_id=host, now=self.clock()
            ),
        )

    def run(self, image_id: uuid.UUID, *, stop_before: str | None = None) -> None:
        """Complete every runnable stage, optionally leaving operations of one purpose."""
        while True:
            op = self.get(image_id).current_operation()
            if op is None or op.state != ops.PENDING or op.purpose == stop_before:
                return
            self.complete(image_id)
