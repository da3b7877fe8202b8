"""The live storage migration commands (architecture §8, docs/adr/0029): ``migrate_image`` and
seed 003's granular verbs.

A migration involves two repositories, each with its own log. The destination's log is written
first: a replica of the image, same id, whose volumes the source's stages make
(``ImageRequested`` with origin ``replica``, or ``ReplicaRenewed`` over the discarded replica of
an aborted migration). Then the source's log records ``ReplicationStarted`` and queues the
work as an operation of the image. A crash between the two leaves a replica that nothing
fills, never a source whose log names a destination that knows nothing.

Every verb queues an operation of the source image: ``migrate_image`` all of the flow
(a live snapshot when attached, ``clone``, ``sync``, ``mirror``, ``switch``), the granular verbs
one step each. The switch's completion removes the image from the source; the replica's
``ReplicaSwitched`` (written by the switch before) makes it the image in the destination.

Imports: :mod:`engine.aggregates`, :mod:`engine.planning`, :mod:`engine.errors`, the unit of
work and the attachment names of this package; of ``engine.formats``, the storage daemon
adapter, qemu-img and the repository driver.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from engine import planning
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Purpose, split_ref
from engine.aggregates.stage_kinds import Stage, SwitchStage
from engine.aggregates.work_rules import synced_volumes
from engine.errors import (
    DaemonError,
    ImageInUse,
    ImageNotFound,
    InvalidParameter,
    NotAttached,
    ReplicationError,
    ReplicationNotReady,
    StrataError,
    WrongImageKind,
)
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.formats.repository.driver import RepositoryStorage
from engine.service.attachments import chain_volumes, mirror_job_name
from engine.service.unit_of_work import ImageService

SYNC_TYPES = ("ALL", "INTERNAL", "LEAF")
SWITCH_REQUESTED = "switch requested"  # the phase engine/executors/migration_stages.py records


class Images(Protocol):
    def image(self, image_id: uuid.UUID | str, /) -> Image | None: ...

    def live_images(self) -> list[Image]: ...


@dataclass(frozen=True)
class Side:
    """One repository of a migration, as the commands reach it."""

    repo_id: str
    service: ImageService
    storage: RepositoryStorage
    images: Images

    @property
    def root(self) -> str:
        return self.storage.root


class MigrationHandlers:
    """The migration commands, on behalf of the host ``host_id``."""

    def __init__(self, host_id: str, qemu: QemuImg, daemon: Callable[[], StorageDaemon]) -> None:
        self.host_id = host_id
        self.qemu = qemu
        self.daemon = daemon

    # --- the whole flow -------------------------------------------------------------------

    def migrate(self, src: Side, dst: Side, image: Image) -> str:
        """Queue the whole migration of ``image`` into ``dst``; return the operation's id."""
        self._check_pair(src, dst, image)
        if image.current_operation() is not None:
            busy = image.current_operation()
            assert busy is not None
            raise ReplicationError(
                f"operation {busy.op_id} ({busy.purpose}) is unfinished; wait for it first",
                image_id=image.id,
            )
        attached = image.attached_on == self.host_id
        chain = list(image.chain)
        stages: list[Stage] = []
        merge: list[str] | None = None
        if attached and image.kind == ops.VIRTUAL_DISK:
            # A live snapshot first: only the small new top is mirrored, the rest is immutable.
            new_top = planning.fresh_volume("qcow2")
            stages.append(
                {
                    "do": "create",
                    "volume": new_top,
                    "backing": chain[-1],
                    "size": image.size,
                    "set_chain": [*chain, new_top],
                }
            )
            merge = [chain[-1], new_top]
            chain.append(new_top)
        target = dst.root
        stages.append({"do": "clone", "target": target, "volumes": self._layout(src, chain)})
        if attached:
            # The volumes below first, then the mirror into a top opened on them: a mirror's
            # target is never reopened while it takes the guest's writes (docs/adr/0029).
            stages.append({"do": "sync", "target": target, "volumes": chain[:-1]})
            stages.append({"do": "mirror", "target": target, "volume": chain[-1]})
        else:
            stages.append({"do": "sync", "target": target, "volumes": chain})
        switch: SwitchStage = {"do": "switch", "target": target, "volume": chain[-1]}
        if merge is not None:
            switch["merge"] = merge
        stages.append(switch)
        op_id = planning.op_id()
        self._begin(src, dst, image, chain, op_id, ops.plan(op_id, Purpose.MIGRATE, *stages))
        return op_id

    # --- seed 003's verbs -----------------------------------------------------------------

    def clone_structure(self, src: Side, dst: Side, image: Image) -> str:
        """The chain as it is, made empty in ``dst`` under a replica; starts the replication."""
        self._check_pair(src, dst, image)
        chain = list(image.chain)
        op_id = planning.op_id()
        clone: Stage = {"do": "clone", "target": dst.root, "volumes": self._layout(src, chain)}
        self._begin(src, dst, image, chain, op_id, ops.plan(op_id, Purpose.CLONE, clone))
        return op_id

    def sync_data(self, src: Side, dst: Side, image: Image, sync_type: str) -> str:
        """Copy the volumes ``sync_type`` names into the replica's clones."""
        self._replicating(src, dst, image)
        chain = image.chain
        volumes = {"ALL": chain, "INTERNAL": chain[:-1], "LEAF": chain[-1:]}[sync_type]
        if sync_type != "INTERNAL" and image.attached_on is not None:
            raise ImageInUse(
                f"attached on {image.attached_on}, a virtual machine writes its top: the top is "
                "mirrored (disk_replicate_start), only INTERNAL is copied",
                image_id=image.id,
            )
        stage: Stage = {"do": "sync", "target": dst.root, "volumes": list(volumes)}
        return self._step(src, image, Purpose.SYNC, stage)

    def replicate_start(self, src: Side, dst: Side, image: Image) -> str:
        """Mirror the attached image's top into the replica's (the job keeps running)."""
        self._attached_here(image)
        if image.kind != ops.VIRTUAL_DISK:
            raise WrongImageKind(image_id=image.id, kind=image.kind, expected=ops.VIRTUAL_DISK)
        self._replicating(src, dst, image)
        if self._mirror(image) is not None:
            raise ReplicationError("its mirror runs already", image_id=image.id)
        stage: Stage = {"do": "mirror", "target": dst.root, "volume": image.chain[-1]}
        return self._step(src, image, Purpose.REPLICATE, stage)

    def replicate_finish(self, src: Side, dst: Side, image: Image) -> str:
        """Queue the switch to the replica once the mirror is ready and the volumes below the
        top are synced (ReplicationNotReady until then); return the operation's id."""
        self._replicating(src, dst, image)
        self._attached_here(image)
        job = self._mirror(image)
        if job is None:
            raise ReplicationError(
                "no mirror runs to finish: disk_replicate_start first", image_id=image.id
            )
        if job.status != "ready":
            raise ReplicationNotReady(
                f"the mirror is {job.status}, {job.current_progress} of {job.total_progress} "
                "bytes copied",
                image_id=image.id,
            )
        busy = image.current_operation()
        if busy is not None:
            raise ReplicationNotReady(
                f"operation {busy.op_id} ({busy.purpose}) is {busy.state}", image_id=image.id
            )
        missing = [ref for ref in image.chain[:-1] if ref not in synced_volumes(image)]
        if missing:
            raise ReplicationNotReady(
                f"{len(missing)} volume(s) below the top are not synced: sync_image_data "
                "INTERNAL first",
                image_id=image.id,
            )
        stage: Stage = {"do": "switch", "target": dst.root, "volume": image.chain[-1]}
        return self._step(src, image, Purpose.SWITCH, stage)

    def abort(self, src: Side, dst: Side | None, image: Image) -> None:
        """disk_replicate_finish onto the source: the mirror is cancelled, the replica
        discarded; the image stays here as it is."""
        target = image.replicating_to
        if target is None:
            raise ReplicationError("no replication runs to abort", image_id=image.id)
        for op in image.operations:
            # A switch that failed before asking QEMU to switch waits for a fix, not QEMU.
            failed_early = op.state in (ops.FAILED, ops.STOPPED) and op.phase != SWITCH_REQUESTED
            if (
                not op.finished
                and not failed_early
                and (op.purpose == Purpose.SWITCH or op.phase == SWITCH_REQUESTED)
            ):
                raise ReplicationError(
                    "its switch is under way: wait for it to end", image_id=image.id
                )
        if image.attached_on is not None:
            self._attached_here(image)

        def command(current: Image) -> None:
            # Decided again on the log as it is now: the switch may have been asked for since.
            now = src.service.now()
            for op in current.operations:
                if not op.finished and op.phase == SWITCH_REQUESTED:
                    raise ReplicationError(
                        "its switch is under way: wait for it to end", image_id=image.id
                    )
            for op in current.operations:
                if not op.finished and op.purpose in ops.MIGRATION:
                    current.abort_operation(
                        op_id=op.op_id, reason="replication aborted", host_id=self.host_id, now=now
                    )
            current.end_replication(outcome="aborted", host_id=self.host_id, now=now)

        # The log first: the executor running the migration sees its claim end and stops, and
        # no switch can be asked for after this.
        src.service.update(image.id, command)
        if image.attached_on is not None:
            self._stop_mirror(image, dst)
        if dst is not None:
            with suppress(ImageNotFound):
                dst.service.update(
                    image.id,
                    lambda replica: replica.discard_replica(
                        reason=f"its migration from {src.root} was aborted",
                        host_id=self.host_id,
                        now=dst.service.now(),
                    ),
                )

    # --- helpers --------------------------------------------------------------------------

    def _check_pair(self, src: Side, dst: Side, image: Image) -> None:
        if src.root == dst.root:
            raise InvalidParameter("another repository than the image's", name="dst_repo_id")
        if image.attached_on not in (None, self.host_id):
            raise NotAttached(
                f"it is attached on {image.attached_on}: migrate it there",
                image_id=image.id,
                host_id=self.host_id,
            )
        if image.replicating_to is not None:
            raise ReplicationError(
                f"a replication to {image.replicating_to} runs already", image_id=image.id
            )
        if image.attached_on is not None and image.kind != ops.VIRTUAL_DISK:
            raise ImageInUse(
                "a snapshot attached read-only has nothing to mirror: detach it, then migrate",
                image_id=image.id,
            )
        there = dst.images.image(image.id)
        # A replica whose source runs no replication is an orphan (a crash right after it was
        # requested): a new migration takes it over.
        orphan = there is not None and there.replica_of is not None
        if there is not None and not there.removed and not orphan:
            raise ReplicationError(
                f"{dst.repo_id!r} holds an image of this id already", image_id=image.id
            )
        for ref in image.chain:
            users = [i.id for i in dst.images.live_images() if i.id != image.id and ref in i.chain]
            if users:
                raise ReplicationError(
                    f"{dst.repo_id!r} holds its volume {ref} already, in the chain of image "
                    f"{users[0]}",
                    image_id=image.id,
                )

    def _layout(self, src: Side, chain: list[str]) -> list[list[object]]:
        """``[ref, virtual size, backing ref]`` of each volume, base first, as the clone makes
        them; a volume still to be made (the live snapshot's) takes the size of the one below."""
        layout: list[list[object]] = []
        size = 0
        for i, ref in enumerate(chain):
            path = src.storage.volume_path(*split_ref(ref))
            if os.path.lexists(path):
                size = int(self.qemu.info(path, fmt=split_ref(ref)[1])["virtual-size"])
            layout.append([ref, size, chain[i - 1] if i else None])
        return layout

    def _begin(
        self,
        src: Side,
        dst: Side,
        image: Image,
        chain: list[str],
        op_id: str,
        operation: ops.OperationPlan,
    ) -> None:
        """The replica in the destination's log, then the replication in the source's."""
        origin = {"how": "replica", "of": src.root, "repository": src.repo_id, "op": op_id}
        existing = dst.images.image(image.id)
        if existing is None:
            replica = Image.request(
                image_id=image.id,
                kind=image.kind,
                size=image.size,
                chain=chain,
                user_data=image.user_data,
                strategy=image.strategy,
                auto_fix=image.auto_fix,
                origin=origin,
                operations=[],
                host_id=self.host_id,
                now=dst.service.now(),
            )
            dst.service.add(replica)
        else:
            dst.service.update(
                image.id,
                lambda current: current.renew_replica(
                    size=image.size,
                    chain=chain,
                    user_data=image.user_data,
                    origin=origin,
                    host_id=self.host_id,
                    now=dst.service.now(),
                ),
            )
        try:
            src.service.update(
                image.id,
                lambda current: current.start_replication(
                    target=dst.root,
                    operation=operation,
                    host_id=self.host_id,
                    now=src.service.now(),
                ),
            )
        except StrataError:
            with suppress(StrataError):
                dst.service.update(
                    image.id,
                    lambda replica: replica.discard_replica(
                        reason="the source refused the migration",
                        host_id=self.host_id,
                        now=dst.service.now(),
                    ),
                )
            raise

    def _step(self, src: Side, image: Image, purpose: Purpose, stage: Stage) -> str:
        op_id = planning.op_id()
        src.service.update(
            image.id,
            lambda current: current.request_migration_step(
                operation=ops.plan(op_id, purpose, stage),
                host_id=self.host_id,
                now=src.service.now(),
            ),
        )
        return op_id

    def _replicating(self, src: Side, dst: Side, image: Image) -> None:
        target = image.replicating_to
        if target == dst.root:
            return
        if target is None:
            replica = dst.images.image(image.id)
            if replica is None or replica.removed or replica.replica_of is None:
                raise ImageNotFound(
                    f"no replica in {dst.repo_id!r}: clone_image_structure first",
                    image_id=image.id,
                )
            raise ReplicationError("no replication of it runs", image_id=image.id)
        raise ReplicationError(f"it is being replicated to {target}", image_id=image.id)

    def _attached_here(self, image: Image) -> None:
        if image.attached_on != self.host_id:
            where = "nowhere" if image.attached_on is None else f"on {image.attached_on}"
            raise NotAttached(f"it is attached {where}", image_id=image.id, host_id=self.host_id)

    def _mirror(self, image: Image) -> _JobState | None:
        daemon = self.daemon()
        if daemon.pid is None:
            return None
        job = daemon.find_job(mirror_job_name(image.id))
        if job is None:
            return None
        return _JobState(job.status, job.current_progress, job.total_progress)

    def _stop_mirror(self, image: Image, dst: Side | None) -> None:
        daemon = self.daemon()
        if daemon.pid is None:
            return
        name = mirror_job_name(image.id)
        if daemon.find_job(name) is not None:
            daemon.stop_job(name, timeout=30.0)
        if dst is None:
            return
        for volume in reversed(chain_volumes(image, dst.storage)):
            with suppress(DaemonError):
                daemon.remove_nodes([volume.node])


@dataclass(frozen=True)
class _JobState:
    status: str
    current_progress: int
    total_progress: int
