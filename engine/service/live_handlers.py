"""The live commands: attach and detach an image, and the block jobs (architecture §8).

One :class:`LiveHandlers` serves one repository on behalf of one host, like
:class:`~engine.service.image_handlers.ImageHandlers`. Attaching records ``ImageAttached`` and
then has this host's storage daemon open the chain and export it over NBD (docs/adr/0027); a
block job is an operation queued on the image like any other (``OperationRequested``): a
``rebase`` stage for a pull, a ``commit`` stage for a commit, run live by the executor of the
host that serves the image, offline by any host otherwise (docs/adr/0028). The job view reads
the daemon's job while one runs here, and the log otherwise.

Imports: :mod:`engine.aggregates`, :mod:`engine.errors`, :mod:`engine.types`, the unit of work
and the attachment names of this package; of ``engine.formats``, the storage daemon adapter,
qemu-img and the repository driver.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Protocol

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation, Purpose, split_ref
from engine.aggregates.stage_kinds import CommitStage, RebaseStage, bandwidth_of
from engine.errors import DaemonError, ImageInUse, InvalidParameter, StaleFix, WrongImageKind
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import Job, StorageDaemon
from engine.formats.repository.driver import RepositoryStorage
from engine.service.attachments import (
    chain_volumes,
    dead_host,
    export_name,
    job_name,
    mirror_job_name,
)
from engine.service.unit_of_work import ImageService
from engine.types import Attachment, BlockJob, Volume


class Images(Protocol):
    def live_images(self) -> list[Image]: ...


class Hosts(Protocol):
    def may_take_over(self, host_id: str, /) -> bool: ...


class LiveHandlers:
    """The live commands of one repository, on behalf of the host ``service`` works for."""

    def __init__(
        self,
        repo_id: str,
        service: ImageService,
        storage: RepositoryStorage,
        images: Images,
        daemon: Callable[[], StorageDaemon],
        qemu: QemuImg,
        hosts: Hosts | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.service = service
        self.storage = storage
        self.images = images
        self.daemon = daemon
        self.qemu = qemu
        self.hosts = hosts

    # --- attachments ----------------------------------------------------------------------

    def attach(self, image: Image) -> Attachment:
        """Serve the image from this host's daemon; the same attachment if it is served."""
        readonly = image.kind == ops.SNAPSHOT
        daemon = self.daemon()
        name = export_name(image.id)
        if any(e.id == name for e in daemon.query_exports()):
            return Attachment(str(image.id), self.repo_id, daemon.nbd_uri(name), readonly)
        host = self.service.host_id

        def command(current: Image) -> None:
            now = self.service.now()
            other = current.attached_on
            dead = other is not None and self.hosts is not None and self.hosts.may_take_over(other)
            if other is not None and other != host and dead:
                current.release_attachment(
                    of_host=other,
                    reason=dead_host(other),
                    host_id=host,
                    now=now,
                )
            current.attach(host_id=host, now=now)

        self.service.update(image.id, command)
        image = self.service.get(image.id)
        volumes = chain_volumes(image, self.storage)
        try:
            top = daemon.add_chain(volumes, read_only=readonly)
            try:
                uri = daemon.export_nbd(top, name, writable=not readonly)
            except BaseException:
                daemon.remove_nodes(reversed([v.node for v in volumes]))
                raise
        except BaseException:
            # Not served: not in use either, so offline stages need not wait for it.
            self.service.update(
                image.id, lambda i: i.tear_down(host_id=host, now=self.service.now())
            )
            raise
        return Attachment(str(image.id), self.repo_id, uri, readonly)

    def detach(self, image: Image) -> None:
        """Stop serving the image (the daemon flushes what it holds as it closes the nodes)
        and record that it is no longer in use. Refused while a replication runs: its
        mirror holds the nodes (ImageInUse)."""
        if image.replicating_to is not None and self._served_here(image):
            raise ImageInUse(
                f"being migrated to {image.replicating_to}: wait for the migration, or abort "
                "it (disk_replicate_finish onto its own repository)",
                image_id=image.id,
            )
        daemon = self.daemon()
        name = export_name(image.id)
        if daemon.pid is not None:
            exports = {e.id: e for e in daemon.query_exports()}
            if name in exports:
                nodes = daemon.backing_chain(exports[name].node)
                daemon.unexport(name)
                daemon.remove_nodes(nodes)
        self.service.update(
            image.id, lambda i: i.tear_down(host_id=self.service.host_id, now=self.service.now())
        )

    def reconcile(self, images: Iterable[Image]) -> list[uuid.UUID]:
        """At connect: release the images the log says this host serves but its daemon does
        not (it died on its own, or the host restarted): nothing serves them, so nothing must
        wait for this host. Returns their ids. Jobs need nothing here: the executor runs this
        host's claimed stages again, and each finds its job (docs/adr/0028)."""
        host = self.service.host_id
        mine = [image for image in images if image.attached_on == host]
        if not mine:
            return []
        daemon = self.daemon()
        served = set() if daemon.pid is None else {e.id for e in daemon.query_exports()}
        released = []
        for image in mine:
            if export_name(image.id) not in served:
                self.service.update(
                    image.id,
                    lambda i: i.release_attachment(
                        of_host=host,
                        reason=f"host {host} restarted and its daemon no longer serves it",
                        host_id=host,
                        now=self.service.now(),
                    ),
                )
                released.append(image.id)
        return released

    # --- the block jobs -------------------------------------------------------------------

    def pull(self, image: Image, base_volume_id: str | None, bandwidth: int) -> str:
        """Queue the pull of everything between the top and ``base_volume_id`` (all of it
        when None) into the top; return the job's id."""
        _require_disk(image)
        chain = image.chain
        if len(chain) < 2:
            raise InvalidParameter(
                f"image {image.id} has one volume: nothing to pull", name="image_id"
            )
        top = chain[-1]
        stage: RebaseStage = {"do": "rebase", "volume": top, "old_backing": chain[-2]}
        if base_volume_id is None:
            stage["set_chain"] = [top]
        else:
            at = _index(chain[:-1], base_volume_id, "base_volume_id")
            if at == len(chain) - 2:
                raise InvalidParameter(
                    f"volume {base_volume_id} is already the top's backing", name="base_volume_id"
                )
            stage["backing"] = chain[at]
            stage["set_chain"] = [*chain[: at + 1], top]
        if bandwidth:
            stage["bandwidth"] = bandwidth
        return self._request(image, Purpose.PULL, stage)

    def commit(self, image: Image, top_volume_id: str, base_volume_id: str, bandwidth: int) -> str:
        """Queue the commit of ``top`` (and what lies between) into ``base``; return its id.
        Refused (ImageInUse) when a volume it writes or drops is read by another image."""
        _require_disk(image)
        chain = image.chain
        top_at = _index(chain, top_volume_id, "top_volume_id")
        base_at = _index(chain, base_volume_id, "base_volume_id")
        if base_at >= top_at:
            raise InvalidParameter(
                f"volume {base_volume_id} is not below {top_volume_id} in the chain",
                name="base_volume_id",
            )
        readers = self._readers(image)
        for ref in chain[base_at : top_at + 1]:
            if ref in readers:
                raise ImageInUse(
                    f"the commit would change volume {ref}, which image {readers[ref]} reads",
                    image_id=image.id,
                )
        stage: CommitStage = {
            "do": "commit",
            "volume": chain[base_at],
            "top": chain[top_at],
            "set_chain": [*chain[: base_at + 1], *chain[top_at + 1 :]],
        }
        if top_at + 1 < len(chain):
            stage["child"] = chain[top_at + 1]
        if bandwidth:
            stage["bandwidth"] = bandwidth
        return self._request(image, Purpose.COMMIT, stage)

    def block_job(self, image: Image) -> BlockJob | None:
        """The image's last block job as QEMU reports it while it runs here, else as the log
        has it; None if the image never had one."""
        mirror = self._mirror_job(image)
        if mirror is not None:
            return mirror
        op = _last_job(image)
        if op is None:
            return None
        kind = "pull" if op.purpose == Purpose.PULL else "commit"
        name = job_name(op.op_id, 0)
        stage = op.stages[0]
        bandwidth = bandwidth_of(stage)
        if not op.finished and image.attached_on == self.service.host_id:
            job = self._daemon_job(name)
            if job is not None:
                state = "ready" if job.status == "ready" else "running"
                if job.status == "concluded":
                    state = "failed" if job.error else "completed"
                return BlockJob(
                    name,
                    kind,
                    job.current_progress,
                    job.total_progress,
                    job.speed,
                    state,
                    job.error,
                )
        end = image.size
        if op.finished:
            return BlockJob(
                name, kind, end, end, bandwidth, "aborted" if op.aborted else "completed", None
            )
        if op.state in (ops.FAILED, ops.STOPPED):
            return BlockJob(name, kind, 0, end, bandwidth, "failed", op.error)
        cur = 0 if op.percent < 0 else end * op.percent // 100
        return BlockJob(name, kind, cur, end, bandwidth, "running", None)

    def set_bandwidth(self, image: Image, bandwidth: int) -> None:
        """Change the running job's limit (QEMU's ``block-job-set-speed``). An offline job
        runs at qemu-img's pace, which has no limit to change: refused."""
        mirror = self._mirror_job(image)
        if mirror is not None:
            self.daemon().set_speed(mirror.job_id, bandwidth)
            return
        op = self._running_job(image)
        name = job_name(op.op_id, op.done)
        if image.attached_on != self.service.host_id or self._daemon_job(name) is None:
            raise InvalidParameter(
                f"block job {name} runs offline (qemu-img), which has no limit to change",
                name="bandwidth",
            )
        self.daemon().set_speed(name, bandwidth)

    def abort(self, image: Image, pivot: bool) -> None:
        """Stop the running job with the chain as it was; with ``pivot``, let a ``ready``
        active commit finish instead (it pivots as soon as it is ready: nothing to stop)."""
        op = self._running_job(image)
        stage = op.stages[op.done]
        if pivot:
            if stage["do"] != "commit" or stage.get("child"):
                raise InvalidParameter(
                    "pivot finishes a ready active commit, not a pull or an intermediate commit",
                    name="pivot",
                )
            return  # an active commit pivots by itself once ready (docs/adr/0028)
        if op.phase:
            raise ImageInUse(
                f"block job {op.op_id} is {op.phase}; it can no longer be aborted",
                image_id=image.id,
            )
        if stage["do"] == "rebase" and op.claim_host is not None and not self._served_here(image):
            raise ImageInUse(
                "an offline pull cannot be stopped halfway (qemu-img rewrites the header first); "
                "it ends by itself",
                image_id=image.id,
            )
        self.service.update(
            image.id,
            lambda i: i.abort_operation(
                op_id=op.op_id,
                reason="abort_block_job",
                host_id=self.service.host_id,
                now=self.service.now(),
            ),
        )
        if self._served_here(image):
            name = job_name(op.op_id, op.done)
            if self._daemon_job(name) is not None:
                with suppress(DaemonError):  # ended meanwhile: the executor dismisses it
                    self.daemon().cancel_job(name, force=True)  # see live_stages._cancelled

    def volume_chain(self, image: Image) -> list[Volume]:
        readers = self._readers(image)
        found = []
        for ref in image.chain:
            volume_id, fmt = split_ref(ref)
            path = self.storage.volume_path(volume_id, fmt)
            size = self.qemu.info(path, fmt=fmt)["virtual-size"]
            found.append(Volume(volume_id, fmt, path, size, ref in readers))
        return found

    # --- helpers --------------------------------------------------------------------------

    def _request(self, image: Image, purpose: Purpose, stage: RebaseStage | CommitStage) -> str:
        operation = ops.plan(uuid.uuid4().hex, purpose, stage)
        self.service.update(
            image.id,
            lambda i: i.request_operation(
                operation=operation, host_id=self.service.host_id, now=self.service.now()
            ),
        )
        return job_name(operation["op_id"], 0)

    def _readers(self, image: Image) -> dict[str, uuid.UUID]:
        """Volumes of ``image``'s chain that another live image also reads, and one reader."""
        mine = set(image.chain)
        readers: dict[str, uuid.UUID] = {}
        for other in self.images.live_images():
            if other.id != image.id:
                for ref in other.chain:
                    if ref in mine:
                        readers.setdefault(ref, other.id)
        return readers

    def _mirror_job(self, image: Image) -> BlockJob | None:
        """A migration's mirror while it runs here (docs/adr/0029)."""
        if image.replicating_to is None or not self._served_here(image):
            return None
        job = self._daemon_job(mirror_job_name(image.id))
        if job is None:
            return None
        state = {"ready": "ready", "concluded": "failed" if job.error else "completed"}
        return BlockJob(
            job.id,
            "mirror",
            job.current_progress,
            job.total_progress,
            job.speed,
            state.get(job.status, "running"),
            job.error,
        )

    def _running_job(self, image: Image) -> Operation:
        op = _last_job(image)
        if op is None or op.finished:
            raise StaleFix(f"no block job runs on image {image.id}")
        return op

    def _served_here(self, image: Image) -> bool:
        return image.attached_on == self.service.host_id

    def _daemon_job(self, name: str) -> Job | None:
        daemon = self.daemon()
        return None if daemon.pid is None else daemon.find_job(name)


def _require_disk(image: Image) -> None:
    """Block jobs rewrite a chain: a snapshot's never changes (WrongImageKind)."""
    if image.kind != ops.VIRTUAL_DISK:
        raise WrongImageKind(image_id=image.id, kind=image.kind, expected=ops.VIRTUAL_DISK)


def _index(chain: list[str], volume_id: str, name: str) -> int:
    for at, ref in enumerate(chain):
        if split_ref(ref)[0] == volume_id:
            return at
    raise InvalidParameter(f"volume {volume_id} is not in the image's chain", name=name)


def _last_job(image: Image) -> Operation | None:
    return next((op for op in reversed(image.operations) if op.purpose in ops.BLOCK_JOBS), None)
