"""``StorageEngine``: the storage API on one host (architecture §1).

Every call validates its arguments, lets the image aggregates decide, appends their events to the
repository's log and returns once they are durable; the executors do the work. This module is
also the one place that wires the engine together (bootstrap): adapters, logs, views, executors.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import threading
import time
import uuid
from typing import Any

import engine.projections.check as fix_rules
from engine import validation
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.application import LogConfig, StrataLogApplication
from engine.boundary import typed_errors
from engine.connections import ConnectedRepository, ViewFollower
from engine.errors import (
    EngineClosed,
    ForeignFile,
    ImageNotFound,
    ImageNotReady,
    InvalidParameter,
    RepositoryAlreadyConnected,
    RepositoryBusy,
    RepositoryNotConnected,
    StrataError,
    WaitTimeout,
    storage_error,
)
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.executors.liveness import HostLease, HostMonitor
from engine.executors.scheduler import Executor
from engine.formats.qemu import image_tools as qemu_adapter
from engine.formats.repository.driver import RepositoryStorage
from engine.formats.repository.registry import get_format
from engine.log.follow import LogFollower
from engine.opaque import value_of
from engine.projections.status import blocker, image_status
from engine.projections.view import RepositoryView
from engine.service.image_handlers import ImageCommands
from engine.service.unit_of_work import ImageService
from engine.types import BROKEN, Fix, ImageInfo, ImageStatus, PreparedImage
from engine.volume_health import find_damaged, identities, volume_faults

# What an auditor's connection may meet on storage it only reads.
_CANNOT_WRITE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def default_state_dir(host_id: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "strata", host_id)


@typed_errors
class StorageEngine(ImageCommands):
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
        qemu: qemu_adapter.QemuImg | None = None,
        crashpoints: CrashPoints = DISARMED,
    ) -> None:
        """See architecture §1. ``crashpoints`` is for crash tests only
        (engine/executors/crashpoints.py): an armed point kills this process there."""
        self.host_id = validation.host_id(host_id)
        self.lease_timeout = validation.positive_seconds(lease_timeout, "lease_timeout")
        self.poll_interval = validation.positive_seconds(poll_interval, "poll_interval")
        if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
            raise InvalidParameter(f"1..64 worker threads, not {workers!r}", name="workers")
        if not isinstance(run_executors, bool):
            raise InvalidParameter("True or False", name="run_executors")
        self.state_dir = os.path.abspath(state_dir or default_state_dir(self.host_id))
        self.run_executors = run_executors
        self.workers = workers
        self.qemu = qemu or qemu_adapter.QemuImg()
        if not isinstance(crashpoints, CrashPoints):
            raise InvalidParameter("a CrashPoints", name="crashpoints")
        self.crashpoints = crashpoints
        self._repos: dict[str, ConnectedRepository] = {}
        self._lock = threading.RLock()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> StorageEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop this host's executors and followers and close every connection."""
        with self._lock:
            self._closed = True
            repos, self._repos = list(self._repos.values()), {}
        errors = []
        for repo in repos:
            try:
                repo.close()
            except StrataError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # --- repositories ---------------------------------------------------------------------

    def create_storage_repository(
        self, repo_format: str, connection_parameters: dict[str, Any]
    ) -> None:
        """Format an empty place as a repository (refuses a non-empty or formatted one)."""
        self._check_open()
        driver = get_format(repo_format)
        params = validation.connection_parameters(connection_parameters)
        driver.create(params, self.host_id)
        storage = driver.open(params)
        with StrataLogApplication(LogConfig(log_dir=storage.log_dir, host_id=self.host_id)) as app:
            app.create_repository(
                format_name=driver.name,
                format_version=driver.version,
                created_at=ImageService(app, self.host_id).now(),
            )

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
        with self._lock:
            self._check_open()
            if repo_id in self._repos:
                raise RepositoryAlreadyConnected(
                    repo_id=repo_id, path=self._repos[repo_id].storage.root
                )
            storage = driver.open(params)
            for other in self._repos.values():
                if os.path.realpath(other.storage.root) == os.path.realpath(storage.root):
                    raise RepositoryAlreadyConnected(repo_id=other.repo_id, path=storage.root)
            self._repos[repo_id] = self._wire(repo_id, repo_format, storage)

    def _wire(
        self, repo_id: str, repo_format: str, storage: RepositoryStorage
    ) -> ConnectedRepository:
        # First, so that a second live process with this host id is refused before it does
        # anything (HostIdInUse), and a restart after a crash takes the id over at once.
        lease: HostLease | None
        try:
            lease = HostLease(
                storage.root, self.host_id, self.lease_timeout, runs_executors=self.run_executors
            ).acquire()
        except OSError as e:
            if self.run_executors or e.errno not in _CANNOT_WRITE:
                raise storage_error(e, "Publishing this host's heartbeat in", storage.root) from e
            # An auditor on storage it may not write: it appends nothing and claims nothing,
            # so there is nothing a lease would protect.
            lease = None
        try:
            return self._wire_leased(repo_id, repo_format, storage, lease)
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    def _wire_leased(
        self,
        repo_id: str,
        repo_format: str,
        storage: RepositoryStorage,
        lease: HostLease | None,
    ) -> ConnectedRepository:
        self._make_state_dir()
        app = StrataLogApplication(LogConfig(log_dir=storage.log_dir, host_id=self.host_id))
        try:
            service = ImageService(app, self.host_id)
            key = hashlib.sha256(os.path.realpath(storage.root).encode()).hexdigest()[:16]
            view = RepositoryView(app, db_path=os.path.join(self.state_dir, f"view-{key}.sqlite"))
            view.catch_up()
            log_follower = LogFollower(app.operation_log, poll_interval=self.poll_interval)
            follower = ViewFollower(view, log_follower, self.poll_interval).start()
            hosts = HostMonitor(
                storage.root,
                self.lease_timeout,
                refresh=min(self.poll_interval, self.lease_timeout / 8),
            )
            repo = ConnectedRepository(
                repo_id, repo_format, storage, app, service, view, follower, lease, hosts
            )
            if self.run_executors:
                repo.executor = Executor(
                    service,
                    view,
                    storage,
                    self.qemu,
                    host_id=self.host_id,
                    find_image=self._find_for_executor,
                    workers=self.workers,
                    poll_interval=self.poll_interval,
                    follower=LogFollower(app.operation_log, poll_interval=self.poll_interval),
                    crashpoints=self.crashpoints,
                    lease=lease,
                    hosts=hosts,
                    needed_elsewhere=lambda: self._needed_elsewhere(storage.root),
                    foreign_ready=self._foreign_ready,
                )
                repo.executor.start()
            return repo
        except BaseException:
            app.close()
            raise

    def _make_state_dir(self) -> None:
        if os.path.lexists(self.state_dir) and not os.path.isdir(self.state_dir):
            raise InvalidParameter(
                f"{self.state_dir} exists and is not a directory; give each host a directory "
                "of its own for its local caches",
                name="state_dir",
            )
        try:
            os.makedirs(self.state_dir, exist_ok=True)
        except OSError as e:
            raise storage_error(e, "Making this host's state directory", self.state_dir) from e
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            raise storage_error(
                OSError(errno.EACCES, "not writable by this process"),
                "Using this host's state directory",
                self.state_dir,
            )

    def disconnect_storage_repository(self, repo_id: str, force: bool = False) -> None:
        """Detach; refused while this host runs stages there, unless ``force``."""
        with self._lock:
            repo = self._repo(repo_id)
            if not force and repo.executor is not None and repo.executor.busy():
                raise RepositoryBusy(repo_id=repo_id)
            del self._repos[repo.repo_id]
        repo.close()

    def describe_repository(self, repo_id: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        repo.follower.caught_up()
        live = repo.view.live_images()
        by_status: dict[str, int] = {}
        for image in live:
            status = self._status(repo, image).status
            by_status[status] = by_status.get(status, 0) + 1
        return {
            **repo.storage.describe(),
            "repo_id": repo.repo_id,
            "images": len(live),
            "virtual_disks": sum(1 for i in live if i.kind == ops.VIRTUAL_DISK),
            "snapshots": sum(1 for i in live if i.kind == ops.SNAPSHOT),
            "removed_images": sum(1 for i in repo.view.images() if i.removed),
            "by_status": by_status,
            "log_position": repo.view.position,
        }

    # --- status, checks and fixes ---------------------------------------------------------

    def get_image_status(self, repo_id: str, image_id: str | uuid.UUID) -> ImageStatus:
        repo, image = self._image_in(repo_id, image_id)
        return self._status(repo, image)

    def _status(self, repo: ConnectedRepository, image: Image) -> ImageStatus:
        """The image's status, its volumes looked at: a missing file (one ``lstat`` each)
        or a volume the last check found damaged, not made again since, makes it broken, and
        says so (ADR 0017)."""
        faults = volume_faults(repo.storage, repo.view, image, repo.lost)
        status = image_status(image, repo.view, (), faults)
        if status.status == BROKEN and status.last_error is None:
            why = blocker(image, repo.view)
            if why is not None:
                return dataclasses.replace(status, last_error=why)
        return status

    def check_storage_repository(
        self, repo_id: str, options: dict[str, Any] | None = None
    ) -> list[Fix]:
        """Compare the log with the files; return the fixes that would help."""
        repo = self._repo(repo_id)
        if options not in (None, {}):
            raise InvalidParameter("check takes no options yet", name="options")
        repo.follower.caught_up()
        unlisted: ForeignFile | None = None
        try:
            files = repo.storage.list_volume_files()
        except ForeignFile as e:  # the volume directory: reported, never listed through
            files, unlisted = [], e
        problems = fix_rules.find_problems(
            repo.view,
            files,
            # Never a header read through a foreign file: it may be a file outside.
            damaged=find_damaged(
                repo.view, [f for f in files if f.foreign is None], repo.sound_headers
            ),
            elsewhere=self._needed_elsewhere(repo.storage.root),
            unlisted=unlisted,
        )
        repo.lost = identities(repo.storage, problems.lost)
        return list(problems.fixes)

    def fix_storage_repository(
        self, repo_id: str, fix: Fix, options: dict[str, Any] | None = None
    ) -> None:
        """Start a fix exactly as returned by check; refuses one that no longer applies."""
        repo = self._repo(repo_id)
        if not isinstance(fix, Fix):
            raise InvalidParameter(f"a Fix from check_storage_repository, not {fix!r}", name="fix")
        if options not in (None, {}):
            raise InvalidParameter("fix takes no options yet", name="options")
        repo.follower.caught_up()
        fix_rules.apply_fix(repo.view, repo.service, fix, self._needed_elsewhere(repo.storage.root))
        repo.follower.caught_up()

    def stop_fix(self, repo_id: str, image_id: str | uuid.UUID, reason: str = "") -> None:
        """Stop the work in progress on an image; it can later be mended or removed."""
        if not isinstance(reason, str) or len(reason) > 1000:
            raise InvalidParameter("a string of at most 1000 characters", name="reason")
        repo, image = self._image_in(repo_id, image_id)
        service = repo.service
        service.update(
            image.id, lambda i: i.stop(reason=reason, host_id=self.host_id, now=service.now())
        )
        repo.follower.caught_up()

    def wait_for_image(
        self, repo_id: str, image_id: str | uuid.UUID, timeout: float | None = None
    ) -> ImageStatus:
        """Block until no stage is pending for the image (or its work is blocked on a fix)."""
        if timeout is not None:
            timeout = validation.positive_seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        repo, image = self._image_in(repo_id, image_id)
        while True:
            self._still_connected(repo)
            repo.follower.check()
            image = self._live(repo, image.id)
            if self._settled(repo.view, image):
                return self._status(repo, image)
            remaining = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and remaining is not None and remaining <= 0:
                status = self._status(repo, image)
                raise WaitTimeout(
                    f"stage {status.stage}, {status.percent_complete}%",
                    image_id=image.id,
                    timeout=timeout,
                )
            repo.follower.wait_for_change(min(self.poll_interval, remaining or self.poll_interval))

    def _still_connected(self, repo: ConnectedRepository) -> None:
        """Raise if the engine was closed or ``repo`` disconnected (by another thread) since
        a waiter started: nothing would ever wake it otherwise."""
        with self._lock:
            self._check_open()
            if self._repos.get(repo.repo_id) is not repo:
                raise RepositoryNotConnected(repo_id=repo.repo_id)

    @staticmethod
    def _settled(view: RepositoryView, image: Image) -> bool:
        if not _blocked_or_done(image):
            return blocker(image, view) is not None  # waits on work that waits for a fix
        for volume in image.chain:
            producer = view.producer_of(volume)
            if producer is not None and not _blocked_or_done(producer):
                return False
        return True

    # --- virtual machines -----------------------------------------------------------------

    def prepare_image(self, repo_id: str, image_id: str | uuid.UUID) -> PreparedImage:
        """The local path and format a virtual machine opens (read-only for snapshots)."""
        repo, image = self._image_in(repo_id, image_id)
        status = self._status(repo, image)
        if status.status == BROKEN:
            raise ImageNotReady(
                status.last_error or f"its work is at stage {status.stage}",
                image_id=image.id,
                status=status.status,
            )
        for ref in image.chain:  # a virtual machine reads the whole chain, and follows links
            try:
                repo.storage.check_own_file(repo.storage.volume_path(*ops.split_ref(ref)))
            except ForeignFile:
                # Broken from now on, as the next check will say too.
                repo.lost.update(identities(repo.storage, [ref]))
                raise
        service = repo.service
        service.update(image.id, lambda i: i.prepare(host_id=self.host_id, now=service.now()))
        repo.follower.caught_up()
        volume_id, fmt = ops.split_ref(image.chain[-1])
        return PreparedImage(
            image_id=str(image.id),
            path=repo.storage.volume_path(volume_id, fmt),
            format=fmt,
            readonly=image.kind == ops.SNAPSHOT,
        )

    def teardown_image(self, repo_id: str, image_id: str | uuid.UUID) -> None:
        repo, image = self._image_in(repo_id, image_id)
        service = repo.service
        service.update(image.id, lambda i: i.tear_down(host_id=self.host_id, now=service.now()))
        repo.follower.caught_up()

    def lookup_image_by_path(self, path: str) -> ImageInfo:
        """The image whose top volume is ``path`` (what a virtual machine has open)."""
        self._check_open()
        if not isinstance(path, str) or not path:
            raise InvalidParameter("a file path", name="path")
        wanted = os.path.realpath(path)
        for repo in self._connected():
            # The repository's own path to each volume: its root may be a link, but a link
            # inside it leads to a file that is not the image's (docs/adr/0016).
            root = repo.storage.root
            real_root = os.path.realpath(root)
            for image in repo.view.live_images():
                volume_id, fmt = ops.split_ref(image.chain[-1])
                own = os.path.relpath(repo.storage.volume_path(volume_id, fmt), root)
                if os.path.join(real_root, own) == wanted:
                    return self._info(repo, image)
        raise ImageNotFound(f"whose volume is {path}", image_id=None)

    # --- lookups --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed()

    def _connected(self) -> list[ConnectedRepository]:
        with self._lock:
            return list(self._repos.values())

    def _repo(self, repo_id: str) -> ConnectedRepository:
        repo_id = validation.repo_id(repo_id)
        with self._lock:
            self._check_open()
            try:
                return self._repos[repo_id]
            except KeyError:
                raise RepositoryNotConnected(repo_id=repo_id) from None

    def _live(self, repo: ConnectedRepository, image_id: uuid.UUID) -> Image:
        image = repo.view.image(image_id)
        if image is None or image.removed:
            repo.follower.caught_up()  # maybe another host made it a moment ago
            image = repo.view.image(image_id)
        if image is None or image.removed:
            elsewhere = [
                r.repo_id
                for r in self._connected()
                if r is not repo and (i := r.view.image(image_id)) is not None and not i.removed
            ]
            where = f"in repository {repo.repo_id!r}"
            if image is not None:
                where += " (it was removed)"
            if elsewhere:
                where += f"; it is in {elsewhere}"
            raise ImageNotFound(where, image_id=image_id)
        return image

    def _image_in(
        self, repo_id: str, image_id: str | uuid.UUID
    ) -> tuple[ConnectedRepository, Image]:
        repo = self._repo(repo_id)
        return repo, self._live(repo, validation.image_id(image_id))

    def _find(
        self, image_id: uuid.UUID, opts: validation.Options
    ) -> tuple[ConnectedRepository, Image]:
        """Look for a live image where the options allow (architecture §1), else everywhere."""
        hint = opts.image_hints.get(image_id)
        if hint is not None:
            repo = self._repo(hint)
            return repo, self._live(repo, image_id)
        names = opts.participating_repositories
        repos = [self._repo(n) for n in names] if names else self._connected()
        for repo in repos:
            image = repo.view.image(image_id)
            if image is not None and not image.removed:
                return repo, image
        for repo in repos:
            repo.follower.caught_up()
            image = repo.view.image(image_id)
            if image is not None and not image.removed:
                return repo, image
        where = f"in {[r.repo_id for r in repos]}" if names else "in any connected repository"
        raise ImageNotFound(where, image_id=image_id)

    def _find_for_executor(self, image_id: uuid.UUID) -> tuple[Image, RepositoryStorage] | None:
        """Where executors read an image from. A snapshot's copy keeps its id (architecture §1), so
        one id can live in two repositories: a copy whose own volumes are still to be made is
        read from only if no other is there, or its copy stage would wait for itself."""
        # A source removed after the copy was asked for is still read, the last choice: its
        # data is freed only once nothing depends on it (ADR 0017).
        best: tuple[tuple[bool, bool], Image, RepositoryStorage] | None = None
        for repo in self._connected():
            image = repo.view.image(image_id)
            if image is None:
                continue
            unfinished = bool(set(image.chain) & image.pending_volumes())
            rank = (unfinished, image.removed)
            if rank == (False, False):
                return image, repo.storage
            if best is None or rank < best[0]:
                best = (rank, image, repo.storage)
        return None if best is None else (best[1], best[2])

    def _needed_elsewhere(self, root: str) -> set[str]:
        """Volumes of the repository at ``root`` that unfinished work in the other connected
        repositories reads (a copy of one of its images, removed or not). A host sees only
        the repositories it connects (ADR 0017)."""
        repos = self._connected()
        here = next((r for r in repos if r.storage.root == root), None)
        needed: set[str] = set()
        if here is None:
            return needed
        for other in repos:
            if other is here:
                continue
            for image in other.view.images():
                if image.removed:
                    continue
                for op in image.operations:
                    if op.finished:
                        continue
                    for stage in op.stages[op.done :]:
                        source = stage.get("source_image")
                        if source is None:
                            continue
                        found = here.view.image(str(source))
                        if found is not None:
                            needed.update(found.chain)
        return needed

    def _foreign_ready(self, storage: RepositoryStorage, ref: str) -> bool:
        """Whether a volume of another connected repository is made: its file is there, or no
        unfinished stage there will make it (then it is lost, and a stage reading it fails)."""
        if os.path.exists(storage.volume_path(*ops.split_ref(ref))):
            return True
        for repo in self._connected():
            if repo.storage.root == storage.root:
                return repo.view.is_ready(ref)
        return False

    def _info(self, repo: ConnectedRepository, image: Image) -> ImageInfo:
        return ImageInfo(
            image_id=str(image.id),
            kind=image.kind,
            size=image.size,
            user_data=value_of(image.user_data),
            created=image.created_on.isoformat(),
            chain_depth=len(image.chain),
            repo_id=repo.repo_id,
        )


def _blocked_or_done(image: Image) -> bool:
    op = image.current_operation()
    return op is None or op.state in (ops.FAILED, ops.STOPPED, ops.HELD)
