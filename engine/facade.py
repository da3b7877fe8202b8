"""``StorageEngine``: seed 000's storage API on one host (SPEC §5).

Every call validates its arguments, lets the image aggregates decide, appends their events to the
repository's log and returns once they are durable; the executors do the work. This module is
also the one place that wires the engine together (bootstrap): adapters, logs, views, executors.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from typing import Any

import engine.projections.fixes as fix_rules
from engine import validation
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.application import LogConfig, StrataLogApplication
from engine.connections import ConnectedRepository, ViewFollower
from engine.errors import (
    ForeignFile,
    ImageNotFound,
    ImageNotReady,
    InvalidParameter,
    RepositoryAlreadyConnected,
    RepositoryBusy,
    RepositoryNotConnected,
    StrataError,
    WaitTimeout,
)
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.executors.liveness import HostLease, HostMonitor
from engine.executors.scheduler import Executor
from engine.formats import qemu as qemu_adapter
from engine.formats.driver import RepositoryStorage, get_format
from engine.images import ImageCommands
from engine.log.follow import LogFollower
from engine.projections.status import image_status
from engine.projections.view import RepositoryView
from engine.service import ImageService
from engine.types import BROKEN, Fix, ImageInfo, ImageStatus, PreparedImage


def default_state_dir(host_id: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "strata", host_id)


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
        """See SPEC §5. ``crashpoints`` is for crash tests only (engine/executors/crashpoints.py):
        an armed point kills this process there."""
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
        lease = HostLease(
            storage.root, self.host_id, self.lease_timeout, runs_executors=self.run_executors
        ).acquire()
        try:
            return self._wire_leased(repo_id, repo_format, storage, lease)
        except BaseException:
            lease.release()
            raise

    def _wire_leased(
        self, repo_id: str, repo_format: str, storage: RepositoryStorage, lease: HostLease
    ) -> ConnectedRepository:
        app = StrataLogApplication(LogConfig(log_dir=storage.log_dir, host_id=self.host_id))
        try:
            service = ImageService(app, self.host_id)
            os.makedirs(self.state_dir, exist_ok=True)
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
                )
                repo.executor.start()
            return repo
        except BaseException:
            app.close()
            raise

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
            status = image_status(image, repo.view, repo.lost).status
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
        return image_status(image, repo.view, repo.lost)

    def check_storage_repository(
        self, repo_id: str, options: dict[str, Any] | None = None
    ) -> list[Fix]:
        """Compare the log with the files; return the fixes that would help."""
        repo = self._repo(repo_id)
        if options not in (None, {}):
            raise InvalidParameter("check takes no options yet", name="options")
        repo.follower.caught_up()
        try:
            problems = fix_rules.find_problems(repo.view, repo.storage.list_volume_files())
        except ForeignFile as e:  # the volume directory: reported, never listed through
            problems = fix_rules.find_problems(repo.view, [], unlisted=e)
        repo.lost = set(problems.lost)
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
        fix_rules.apply_fix(repo.view, repo.service, fix)
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
            repo.follower.check()
            image = self._live(repo, image.id)
            if self._settled(repo.view, image):
                return image_status(image, repo.view, repo.lost)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                status = image_status(image, repo.view, repo.lost)
                raise WaitTimeout(
                    f"stage {status.stage}, {status.percent_complete}%",
                    image_id=image.id,
                    timeout=timeout,
                )
            repo.follower.wait_for_change(min(self.poll_interval, remaining or self.poll_interval))

    @staticmethod
    def _settled(view: RepositoryView, image: Image) -> bool:
        if not _blocked_or_done(image):
            return False
        for volume in image.chain:
            producer = view.producer_of(volume)
            if producer is not None and not _blocked_or_done(producer):
                return False
        return True

    # --- virtual machines -----------------------------------------------------------------

    def prepare_image(self, repo_id: str, image_id: str | uuid.UUID) -> PreparedImage:
        """The local path and format a virtual machine opens (read-only for snapshots)."""
        repo, image = self._image_in(repo_id, image_id)
        status = image_status(image, repo.view, repo.lost)
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
                repo.lost.add(ref)  # broken from now on, as the next check will say too
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
        raise ImageNotFound(f"whose volume is {path}", image_id="(any)")

    # --- lookups --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidParameter("the engine is closed", name="self")

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
        """Look for a live image where the options allow (seed 000), else everywhere."""
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
        """Where executors read an image from. A snapshot's copy keeps its id (seed 000), so
        one id can live in two repositories: a copy whose own volumes are still to be made is
        read from only if no other is there, or its copy stage would wait for itself."""
        unfinished = None
        for repo in self._connected():
            image = repo.view.image(image_id)
            if image is None or image.removed:
                continue
            if not set(image.chain) & image.pending_volumes():
                return image, repo.storage
            unfinished = unfinished or (image, repo.storage)
        return unfinished

    def _info(self, repo: ConnectedRepository, image: Image) -> ImageInfo:
        return ImageInfo(
            image_id=str(image.id),
            kind=image.kind,
            size=image.size,
            user_data=image.user_data,
            created=image.created_on.isoformat(),
            chain_depth=len(image.chain),
            repo_id=repo.repo_id,
        )


def _blocked_or_done(image: Image) -> bool:
    op = image.current_operation()
    return op is None or op.state in (ops.FAILED, ops.STOPPED, ops.HELD)
