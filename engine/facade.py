"""``StorageEngine``: the storage API on one host (architecture §1).

A thin facade (docs/adr/0020). Each call validates its arguments before anything is written
(engine/validation.py), finds the repositories and images it names (engine/host_repositories.py),
and delegates: a write to a command of the service layer (engine/service/), which returns what
the call returns once its events are durable, a read to engine/queries.py. After a write the
repository's view is caught up, so the caller's next read sees it. What leaves a call is a
:class:`~engine.errors.StrataError` (engine/boundary.py). The executors do the work; what is
built, and how, is engine/bootstrap.py.

Imports: :mod:`engine.bootstrap`, :mod:`engine.host_repositories`, :mod:`engine.connections`,
:mod:`engine.queries`, the service layer's handlers, :mod:`engine.validation`,
:mod:`engine.boundary`, the fixes' decoding (:mod:`engine.projections.check`), the repository
format registry, the deep check's plan (:mod:`engine.volume_health`), and the public
:mod:`engine.errors` and :mod:`engine.types`; for its
signature only, the crash points and the QEMU adapter a test may pass in; the storage
daemon adapter's :class:`~engine.formats.qemu.storage_daemon.ChainVolume` for attachments.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import engine.projections.check as fix_rules
from engine import queries, validation
from engine.aggregates import operations as ops
from engine.aggregates.operations import Operation
from engine.bootstrap import EngineConfig, Wiring
from engine.boundary import typed_errors
from engine.connections import ConnectedRepository
from engine.errors import (
    DeepCheckUnfinished,
    ImageNotFound,
    InvalidParameter,
    ReplicationError,
    ReplicationSwitchFailed,
    WaitTimeout,
)
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.repository.registry import get_format
from engine.host_repositories import replica_not_ready
from engine.service import check_handlers, fix_handlers, repository_handlers
from engine.service.attachments import export_name
from engine.service.migration_handlers import SYNC_TYPES, MigrationHandlers, Side
from engine.service.unit_of_work import utc_now
from engine.types import Attachment, BlockJob, Fix, ImageInfo, ImageStatus, PreparedImage, Volume
from engine.volume_health import deep_check_stage

# Seconds create_snapshot waits for the daemon to switch an attached disk to its new overlay.
LIVE_SWITCH_TIMEOUT = 60.0
# Seconds disk_replicate_start and disk_replicate_finish wait for their operation (behind the
# clone, when it still runs).
REPLICATION_TIMEOUT = 600.0
# Seconds between looks at the source's log while a wait follows a migration.
MIGRATION_POLL = 0.1


@typed_errors
class StorageEngine:
    """One host's view of the shared storage: connect repositories, manage images."""

    def __init__(
        self,
        host_id: str,
        *,
        state_dir: str | None = None,
        run_executors: bool = True,
        lease_timeout: float = 60.0,
        poll_interval: float = 1.0,
        workers: int = 2,
        qemu: QemuImg | None = None,
        crashpoints: CrashPoints = DISARMED,
    ) -> None:
        """See architecture §1 and :class:`~engine.bootstrap.EngineConfig`."""
        self.config = EngineConfig.checked(
            host_id,
            state_dir=state_dir,
            run_executors=run_executors,
            lease_timeout=lease_timeout,
            poll_interval=poll_interval,
            workers=workers,
            crashpoints=crashpoints,
        )
        self.host_id = self.config.host_id
        self._wiring = Wiring(self.config, qemu)
        self._repos = self._wiring.repositories
        self._migration = MigrationHandlers(self.host_id, self._wiring.qemu, self._wiring.daemon)

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> StorageEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop this host's executors and followers and close every connection; the storage
        daemon keeps serving the attached images (docs/adr/0027)."""
        try:
            self._repos.close()
        finally:
            self._wiring.close_daemon()

    # --- repositories ---------------------------------------------------------------------

    def create_storage_repository(
        self, repo_format: str, connection_parameters: dict[str, Any]
    ) -> None:
        """Format an empty place as a repository (refuses a non-empty or formatted one)."""
        self._repos.check_open()
        driver = get_format(repo_format)
        params = validation.connection_parameters(connection_parameters)
        repository_handlers.create_repository(driver, params, self.host_id, utc_now)

    def connect_storage_repository(
        self,
        repo_id: str,
        repo_format: str,
        connection_parameters: dict[str, Any] | None = None,
    ) -> None:
        """Attach a repository under a transient name (this host only)."""
        repo_id = validation.repo_id(repo_id)
        driver = get_format(repo_format)
        params = validation.connection_parameters(connection_parameters)
        self._wiring.connect(repo_id, repo_format, driver, params)

    def disconnect_storage_repository(self, repo_id: str, force: bool = False) -> None:
        """Detach; refused while this host runs stages there, unless ``force``."""
        self._repos.disconnect(repo_id, force)

    def describe_repository(self, repo_id: str) -> dict[str, Any]:
        repo = self._repos[repo_id]
        repo.follower.caught_up()
        return queries.describe(repo)

    # --- the storage API's four operations -------------------------------------------------------

    def create_virtual_disk(
        self,
        target_repo_id: str,
        size: int,
        base_snapshot_id: str | uuid.UUID | None = None,
        user_data: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """A new mutable image, blank or with a snapshot's content; returns its id."""
        repo = self._repos[target_repo_id]
        size = validation.size(size)
        data = validation.user_data(user_data)
        opts = validation.options(options)
        if base_snapshot_id is None:
            new_id = repo.images.create_virtual_disk(size, data, opts)
        else:
            snapshot_id = validation.image_id(base_snapshot_id, "base_snapshot_id")
            found_in, snapshot = self._repos.find(snapshot_id, opts)
            new_id = repo.images.create_virtual_disk(
                size, data, opts, snapshot, snapshot_elsewhere=found_in is not repo
            )
        self._written(repo)
        return str(new_id)

    def create_snapshot(
        self,
        target_repo_id: str,
        base_virtual_disk_id: str | uuid.UUID,
        user_data: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """A new immutable image with the disk's current content; the disk stays writable."""
        repo, disk = self._repos.image_in(target_repo_id, base_virtual_disk_id)
        data = validation.user_data(user_data)
        opts = validation.options(options)
        new_id = repo.images.create_snapshot(disk, data, opts)
        self._written(repo)
        served_by = disk.attached_on
        if served_by is not None and (served_by != self.host_id or self.config.run_executors):
            self._live_switch(repo, disk.id)
        return str(new_id)

    def copy_image(
        self,
        target_repo_id: str,
        image_id: str | uuid.UUID,
        base_image_id: str | uuid.UUID | None = None,
        user_data: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """Copy an image (usually to another repository); with a base, only the difference."""
        target = self._repos[target_repo_id]
        opts = validation.options(options)
        source_id = validation.image_id(image_id)
        data = validation.user_data(user_data) if user_data is not None else None
        base_id = (
            None if base_image_id is None else validation.image_id(base_image_id, "base_image_id")
        )
        found_in, source = self._repos.find(source_id, opts)
        base = None if base_id is None else self._repos.live(target, base_id)
        if base is not None and base.replica_of is not None:
            raise replica_not_ready(base)  # no incremental copy onto a migration's replica
        new_id = target.images.copy_image(
            source,
            source.user_data if data is None else data,
            opts,
            base,
            source_elsewhere=found_in is not target,
        )
        self._written(target)
        return str(new_id)

    def remove_image(
        self, repo_id: str, image_id: str | uuid.UUID, options: dict[str, Any] | None = None
    ) -> None:
        """Gone for users at once; its data is freed by clean and merge fixes later."""
        repo, image = self._repos.image_in(repo_id, image_id)
        validation.options(options)
        repo.images.remove_image(image.id)
        self._written(repo)

    # --- metadata -------------------------------------------------------------------------

    def list_images(self, repo_id: str) -> list[ImageInfo]:
        repo = self._repos[repo_id]
        # A replica being filled by a migration is not an image of this repository yet.
        return [queries.info_of(repo, i) for i in repo.view.live_images() if i.replica_of is None]

    def get_image_info(self, repo_id: str, image_id: str | uuid.UUID) -> ImageInfo:
        repo, image = self._repos.image_in(repo_id, image_id)
        return queries.info_of(repo, image)

    def set_user_data(self, repo_id: str, image_id: str | uuid.UUID, user_data: Any) -> None:
        repo, image = self._repos.image_in(repo_id, image_id)
        repo.images.set_user_data(image.id, validation.user_data(user_data))
        self._written(repo)

    def resize_virtual_disk(self, repo_id: str, image_id: str | uuid.UUID, new_size: int) -> None:
        """Grow a virtual disk (its top volume); shrinking is refused."""
        repo, image = self._repos.image_in(repo_id, image_id)
        repo.images.resize_virtual_disk(image, validation.size(new_size, "new_size"))
        self._written(repo)

    # --- status, checks and fixes ---------------------------------------------------------

    def get_image_status(self, repo_id: str, image_id: str | uuid.UUID) -> ImageStatus:
        repo, image = self._repos.image_in(repo_id, image_id)
        return queries.status_of(repo, image)

    def image_changes(
        self, after: dict[str, int], timeout: float = 0.0
    ) -> dict[str, tuple[int, dict[str, int]]]:
        """What changed since a point of each connected repository's log, as its view has
        folded it: ``{repo_id: (position, {image_id: seq})}``, ``position`` the sequence number
        the view reached and each image touched by a record after ``after[repo_id]`` (up to
        ``position``) with the sequence number of its last such record. A repository missing
        from ``after`` is reported from its position now (nothing touched). Waits up to
        ``timeout`` seconds for a view to move past ``after`` when none has; never appends.
        For followers of the status (``strata serve``'s ``GET /events``)."""
        if not isinstance(after, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in after.items()
        ):
            raise InvalidParameter("a dict of repository ids to sequence numbers", name="after")
        if timeout:
            timeout = validation.positive_seconds(timeout, "timeout")
        deadline = time.monotonic() + timeout
        while True:
            repos = self._repos.all()
            out: dict[str, tuple[int, dict[str, int]]] = {}
            for repo in repos:
                repo.follower.check()
                position = repo.view.position
                start = after.get(repo.repo_id, position)
                touched: dict[str, int] = {}
                while start < position:
                    records = repo.app.operation_log.read(start + 1, position, 10_000)
                    if not records:
                        break
                    for record in records:
                        key = record.originator_id
                        if isinstance(key, uuid.UUID) and repo.view.image(key) is not None:
                            touched[str(key)] = record.seq
                    start = records[-1].seq
                out[repo.repo_id] = (position, touched)
            left = deadline - time.monotonic()
            moved = any(pos > after.get(r, pos) for r, (pos, _) in out.items())
            if moved or left <= 0 or not repos:
                return out
            # Each view's follower wakes its waiters; several repositories share the wait.
            repos[0].follower.wait_for_change(left if len(repos) == 1 else min(left, 0.05))

    def check_storage_repository(
        self, repo_id: str, options: dict[str, Any] | None = None
    ) -> list[Fix]:
        """Compare the log with the files; return the fixes that would help.

        With ``{"deep": True}``, first read every volume of the live chains (docs/adr/0033):
        ``qemu-img check`` of each qcow2 volume, and each volume that has a recorded digest
        against it. That is durable work on a carrier (``describe_repository`` names it while
        it runs, and ``stop_fix`` on it stops it: DeepCheckUnfinished), which this call waits
        for; what it finds makes the images reading the volume broken, and the fixes returned
        offer to mend them. With ``participating_repositories``, replicas of lost volumes are
        looked for only there (docs/adr/0034)."""
        repo = self._repos[repo_id]
        deep = validation.check_options(options)
        participating = validation.fix_options(options, also=frozenset({"deep"}))
        repo.follower.caught_up()
        if deep:
            self._deep_check(repo)
        root = repo.storage.root
        return queries.check(
            repo,
            self._repos.needed_elsewhere(root),
            self._repos.writing_into(root),
            replicas=self._repos.replicas(root, participating),
        )

    def _deep_check(self, repo: ConnectedRepository) -> None:
        """Queue a deep check and wait for it: as long as it takes to read the volumes."""
        stage = deep_check_stage(repo.view)
        if stage is None:
            return  # no volume to read
        check = check_handlers.start_deep_check(repo.service, stage)
        self._written(repo)
        op = self._await_operation(repo, check.image_id, check.op_id, math.inf)
        if op is None or not op.finished:
            outcome = "stopped" if op is not None and op.state == ops.STOPPED else "failed"
            detail = "its carrier is gone" if op is None else op.error or outcome
            raise DeepCheckUnfinished(detail, image_id=check.image_id, outcome=outcome)
        repo.follower.caught_up()

    def fix_storage_repository(
        self, repo_id: str, fix: Fix, options: dict[str, Any] | None = None
    ) -> None:
        """Start a fix exactly as returned by check; refuses one that no longer applies."""
        repo = self._repos[repo_id]
        if not isinstance(fix, Fix):
            raise InvalidParameter(f"a Fix from check_storage_repository, not {fix!r}", name="fix")
        participating = validation.fix_options(options)
        repo.follower.caught_up()
        root = repo.storage.root
        plan = fix_rules.decode_fix(
            repo.view,
            fix,
            self._repos.needed_elsewhere(root),
            self._repos.writing_into(root),
            self._repos.replicas(root, participating),
        )
        fix_handlers.start_fix(repo.service, plan)
        self._written(repo)

    def stop_fix(self, repo_id: str, image_id: str | uuid.UUID, reason: str = "") -> None:
        """Stop the work in progress on an image; it can later be mended or removed."""
        if not isinstance(reason, str) or len(reason) > 1000:
            raise InvalidParameter("a string of at most 1000 characters", name="reason")
        repo = self._repos[repo_id]
        # A deep check's carrier is no live image, but its work may be stopped (ADR 0033).
        image = queries.deep_check_carrier(repo, validation.image_id(image_id))
        if image is None:
            image = self._repos.live(repo, validation.image_id(image_id))
        fix_handlers.stop_fix(repo.service, image.id, reason)
        self._written(repo)

    def wait_for_image(
        self, repo_id: str, image_id: str | uuid.UUID, timeout: float | None = None
    ) -> ImageStatus:
        """Block until no stage is pending for the image (or its work is blocked on a fix)."""
        if timeout is not None:
            timeout = validation.positive_seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        poll_interval = self.config.poll_interval
        repo, image = self._repos.image_in(repo_id, image_id)
        while True:
            self._repos.still_connected(repo)
            repo.follower.check()
            moved = queries.migrated_to(repo.view, image.id)
            if moved is not None and (there := self._repos.at(moved)) is not None:
                repo = there  # the image lives there now: its work there is waited for
                repo.follower.caught_up()
            image = self._repos.live(repo, image.id)
            # A migration's replica, or the image it became: waited for until the source is
            # done with it too (it removes itself right after the switch).
            moving = image.origin.get("how") == "replica"
            if moving and not queries.migration_ended(self._repos.all(), repo, image):
                pass
            elif image.replica_of is not None or queries.settled(repo.view, image):
                return queries.status_of(repo, image)
            remaining = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and remaining is not None and remaining <= 0:
                status = queries.status_of(repo, image)
                raise WaitTimeout(
                    f"stage {status.stage}, {status.percent_complete}%",
                    image_id=image.id,
                    timeout=timeout,
                )
            # The source's log does not wake this wait: it looks again soon.
            interval = min(poll_interval, MIGRATION_POLL) if moving else poll_interval
            repo.follower.wait_for_change(min(interval, remaining or interval))

    # --- virtual machines -----------------------------------------------------------------

    def prepare_image(self, repo_id: str, image_id: str | uuid.UUID) -> PreparedImage:
        """The local path and format a virtual machine opens (read-only for snapshots)."""
        repo, image = self._repos.image_in(repo_id, image_id)
        queries.check_usable(repo, image)
        repo.images.prepare_image(image.id)
        self._written(repo)
        volume_id, fmt = ops.split_ref(image.chain[-1])
        return PreparedImage(
            image_id=str(image.id),
            path=repo.storage.volume_path(volume_id, fmt),
            format=fmt,
            readonly=image.kind == ops.SNAPSHOT,
        )

    def teardown_image(self, repo_id: str, image_id: str | uuid.UUID) -> None:
        repo, image = self._repos.image_in(repo_id, image_id)
        repo.images.teardown_image(image.id)
        self._written(repo)

    def attach_image(self, repo_id: str, image_id: str | uuid.UUID) -> Attachment:
        """Serve the image from this host's daemon over NBD (docs/adr/0027); while it is
        attached, its work runs live here and offline stages that would change it wait."""
        repo, image = self._repos.image_in(repo_id, image_id)
        if image.attached_on != self.host_id:
            queries.check_usable(repo, image)
        attachment = repo.live.attach(image)
        self._written(repo)
        return attachment

    def detach_image(self, repo_id: str, image_id: str | uuid.UUID) -> None:
        """Stop serving the image (its writes flushed) and record that it is no longer in use."""
        repo, image = self._repos.image_in(repo_id, image_id)
        repo.live.detach(image)
        self._written(repo)

    def list_attachments(self) -> list[Attachment]:
        """The images this host's daemon serves, of the connected repositories."""
        self._repos.check_open()
        daemon = self._wiring.daemon()
        if daemon.pid is None:  # none runs: nothing is served, and none is started to say so
            return []
        names = {e.id for e in daemon.query_exports() if not e.shutting_down}
        found: dict[str, Attachment] = {}
        for repo in self._repos.all():
            for image in repo.view.images():
                name = export_name(image.id)
                # A migration's replica is served only once it is the image (docs/adr/0029).
                if name not in names or image.removed or image.replica_of is not None:
                    continue
                # Switched, the image is live in both logs until the source removes its copy:
                # the export is the destination's, the one not replicating.
                if name in found and image.replicating_to is not None:
                    continue
                readonly = image.kind == ops.SNAPSHOT
                uri = daemon.nbd_uri(name)
                found[name] = Attachment(str(image.id), repo.repo_id, uri, readonly)
        return list(found.values())

    # --- block jobs (architecture §8) ---------------------------------------------------------

    def get_volume_chain(self, repo_id: str, image_id: str | uuid.UUID) -> list[Volume]:
        """The image's volumes, base first; ``shared`` when another live image reads one."""
        repo, image = self._repos.image_in(repo_id, image_id)
        return repo.live.volume_chain(image)

    def block_pull(
        self,
        repo_id: str,
        image_id: str | uuid.UUID,
        base_volume_id: str | None = None,
        bandwidth: int | None = None,
    ) -> str:
        """Fold the volumes between ``base_volume_id`` (all, when None) and the top into the
        top; live when the image is attached here. Returns the job id."""
        repo, image = self._repos.image_in(repo_id, image_id)
        base = None if base_volume_id is None else validation.volume_id(base_volume_id)
        job = repo.live.pull(image, base, validation.bandwidth(bandwidth))
        self._written(repo)
        return job

    def block_commit(
        self,
        repo_id: str,
        image_id: str | uuid.UUID,
        top_volume_id: str,
        base_volume_id: str,
        bandwidth: int | None = None,
    ) -> str:
        """Write ``top`` and what lies between it and ``base`` down into ``base``; with the
        active volume it ends with a pivot. Returns the job id."""
        repo, image = self._repos.image_in(repo_id, image_id)
        top = validation.volume_id(top_volume_id, "top_volume_id")
        base = validation.volume_id(base_volume_id, "base_volume_id")
        job = repo.live.commit(image, top, base, validation.bandwidth(bandwidth))
        self._written(repo)
        return job

    def get_block_job(self, repo_id: str, image_id: str | uuid.UUID) -> BlockJob | None:
        repo, image = self._repos.image_in(repo_id, image_id)
        return repo.live.block_job(image)

    def set_block_job_bandwidth(
        self, repo_id: str, image_id: str | uuid.UUID, bandwidth: int
    ) -> None:
        repo, image = self._repos.image_in(repo_id, image_id)
        repo.live.set_bandwidth(image, validation.bandwidth(bandwidth))

    def abort_block_job(self, repo_id: str, image_id: str | uuid.UUID, pivot: bool = False) -> None:
        """Stop the job, the chain left valid; ``pivot`` lets a ready active commit finish."""
        if not isinstance(pivot, bool):
            raise InvalidParameter("True or False", name="pivot")
        repo, image = self._repos.image_in(repo_id, image_id)
        target = image.replicating_to
        dst = None if target is None else self._repos.at(target)
        job = None if dst is None else repo.live.block_job(image)
        if dst is not None and job is not None and job.kind == "mirror":
            # libvirt's semantics for a copy job: pivot switches to the copy, else it is dropped.
            self.disk_replicate_finish(repo_id, image.id, dst.repo_id if pivot else repo.repo_id)
            return
        repo.live.abort(image, pivot)
        self._written(repo)

    # --- live storage migration (architecture §8, seed 003) -------------------------------------

    def migrate_image(self, repo_id: str, image_id: str | uuid.UUID, dst_repo_id: str) -> str:
        """Move the image into ``dst_repo_id``, keeping its id (and, attached, its NBD
        address): one durable operation of seed 003's flow (docs/adr/0029). Returns its id;
        ``wait_for_image(dst_repo_id, image_id)`` waits for the end."""
        src, image = self._repos.image_in(repo_id, image_id)
        dst = self._destination(dst_repo_id)
        op_id = self._migration.migrate(_side(src), _side(dst), image)
        self._written(dst)
        self._written(src)
        return op_id

    def clone_image_structure(
        self, repo_id: str, image_id: str | uuid.UUID, dst_repo_id: str
    ) -> str:
        """Make the image's chain, empty, in ``dst_repo_id`` (same ids, formats, sizes and
        relative backing names); the replication starts. Returns the operation's id."""
        src, image = self._repos.image_in(repo_id, image_id)
        dst = self._destination(dst_repo_id)
        op_id = self._migration.clone_structure(_side(src), _side(dst), image)
        self._written(dst)
        self._written(src)
        return op_id

    def sync_image_data(
        self, repo_id: str, image_id: str | uuid.UUID, dst_repo_id: str, sync_type: str
    ) -> str:
        """Copy ``ALL`` volumes, the ``INTERNAL`` ones (all but the top) or the ``LEAF`` (the
        top) into the cloned structure. Returns the operation's id."""
        if sync_type not in SYNC_TYPES:
            raise InvalidParameter(
                f"one of {list(SYNC_TYPES)}, not {sync_type!r}", name="sync_type"
            )
        src, image = self._repos.image_in(repo_id, image_id)
        dst = self._destination(dst_repo_id)
        op_id = self._migration.sync_data(_side(src), _side(dst), image, sync_type)
        self._written(src)
        return op_id

    def disk_replicate_start(
        self, repo_id: str, image_id: str | uuid.UUID, dst_repo_id: str
    ) -> None:
        """Mirror the attached image's top into its clone in ``dst_repo_id``: from when this
        returns, every write goes to both."""
        src, image = self._repos.image_in(repo_id, image_id)
        dst = self._destination(dst_repo_id)
        op_id = self._migration.replicate_start(_side(src), _side(dst), image)
        self._written(src)
        op = self._await_operation(src, image.id, op_id, REPLICATION_TIMEOUT)
        if op is not None and not op.finished:
            raise ReplicationError(f"the mirror did not start: {op.error}", image_id=image.id)

    def disk_replicate_finish(
        self, repo_id: str, image_id: str | uuid.UUID, dst_repo_id: str
    ) -> None:
        """Switch the attached image to its replica in ``dst_repo_id`` (ReplicationNotReady
        until the mirror is ready and the volumes below the top are synced); with
        ``dst_repo_id == repo_id``, abort instead: the image stays here."""
        dst_name = validation.repo_id(dst_repo_id)
        src, image = self._repos.image_in(repo_id, image_id)
        if dst_name == src.repo_id:
            target = image.replicating_to
            dst = None if target is None else self._repos.at(target)
            self._migration.abort(_side(src), None if dst is None else _side(dst), image)
            self._written(src)
            if dst is not None:
                self._written(dst)
            return
        dst = self._destination(dst_name)
        op_id = self._migration.replicate_finish(_side(src), _side(dst), image)
        self._written(src)
        op = self._await_operation(src, image.id, op_id, REPLICATION_TIMEOUT)
        if op is not None and not op.finished:
            raise ReplicationSwitchFailed(op.error or "stopped", image_id=image.id)
        self._written(dst)

    def lookup_image_by_path(self, path: str) -> ImageInfo:
        """The image whose top volume is ``path`` (what a virtual machine has open)."""
        self._repos.check_open()
        if not isinstance(path, str) or not path:
            raise InvalidParameter("a file path", name="path")
        found = queries.image_at_path(self._repos.all(), path)
        if found is None:
            raise ImageNotFound(f"whose volume is {path}", image_id=None)
        return queries.info_of(*found)

    # --- helpers --------------------------------------------------------------------------

    def _live_switch(self, repo: ConnectedRepository, disk_id: uuid.UUID) -> None:
        """Wait until the daemon writes to the snapshot's new overlay (the executor runs the
        stage at once): the snapshot then holds exactly what was written before the call
        returned. A switch that failed leaves the disk broken, saying why; the snapshot stays."""
        deadline = time.monotonic() + LIVE_SWITCH_TIMEOUT
        while time.monotonic() < deadline:
            repo.follower.check()
            disk = self._repos.live(repo, disk_id)
            op = next(
                (o for o in reversed(disk.operations) if o.purpose == ops.Purpose.SNAPSHOT), None
            )
            if op is None or op.state != ops.PENDING:
                return
            repo.follower.wait_for_change(0.05)

    def _destination(self, dst_repo_id: str) -> ConnectedRepository:
        dst = self._repos[dst_repo_id]
        dst.follower.caught_up()
        return dst

    def _await_operation(
        self, repo: ConnectedRepository, image_id: uuid.UUID, op_id: str, timeout: float
    ) -> Operation | None:
        """Wait until the operation is done, failed or stopped; None if it never got there
        (WaitTimeout after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            repo.follower.check()
            image = repo.view.image(image_id)
            op = None if image is None else image.operation(op_id)
            if op is None or op.finished or op.state in (ops.FAILED, ops.STOPPED):
                return op
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"operation {op_id} is at stage {op.stage_label()}",
                    image_id=image_id,
                    timeout=timeout,
                )
            repo.follower.wait_for_change(min(0.05, remaining))

    @staticmethod
    def _written(repo: ConnectedRepository) -> None:
        """Read your writes: the view shows what the call committed before it returns."""
        repo.follower.caught_up()


def _side(repo: ConnectedRepository) -> Side:
    return Side(repo.repo_id, repo.service, repo.storage, repo.view)
