"""The one place that wires the engine together (docs/adr/0020), from an explicit config.

:class:`EngineConfig` is everything a host is given, checked once. :class:`Wiring` builds the
parts of one host (its QEMU adapter, its registry of connected repositories, its storage daemon
handle, made on first use) and, on each
connect, the parts of that repository: this host's lease there, the log application, the unit of
work and the image commands, the view and the thread that keeps it current, the watch on the
other hosts and, unless the host only reads and appends, the executor. Nothing else in the engine
builds these parts, and nothing below the facade reads the environment for them.

Imports: anything below the facade: the service layer, projections, executors, adapters,
:mod:`engine.connections` and :mod:`engine.host_repositories`. Only the facade imports this.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from engine import validation
from engine.application import LogConfig, StrataLogApplication
from engine.connections import ConnectedRepository, ViewFollower
from engine.errors import DaemonError, InvalidParameter, storage_error
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.executors.liveness import HostLease, HostMonitor
from engine.executors.scheduler import Executor
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.formats.repository.driver import RepositoryFormat, RepositoryStorage
from engine.host_repositories import HostRepositories
from engine.log.follow import LogFollower
from engine.projections.view import RepositoryView
from engine.service.image_handlers import ImageHandlers
from engine.service.live_handlers import LiveHandlers
from engine.service.unit_of_work import ImageService

logger = logging.getLogger("engine")

# What an auditor's connection may meet on storage it only reads.
_CANNOT_WRITE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def default_state_dir(host_id: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "strata", host_id)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What one host is given (architecture §1). ``crashpoints`` is for crash tests only
    (engine/executors/crashpoints.py): an armed point kills this process there."""

    host_id: str
    state_dir: str  # this host's local caches (the views' read models)
    run_executors: bool = True  # False: a host that only appends and reads
    lease_timeout: float = 60.0  # seconds without a heartbeat that make a host count as dead
    poll_interval: float = 1.0  # how often views and executors look at other hosts' appends
    workers: int = 2  # stages this host runs at once, per repository
    crashpoints: CrashPoints = DISARMED

    @classmethod
    def checked(
        cls,
        host_id: object,
        *,
        state_dir: str | None = None,
        run_executors: object = True,
        lease_timeout: object = 60.0,
        poll_interval: object = 1.0,
        workers: object = 2,
        crashpoints: object = DISARMED,
    ) -> EngineConfig:
        """The config for these arguments, each checked (InvalidParameter) and the state
        directory made absolute (by default under the user's state directory)."""
        host = validation.host_id(host_id)
        lease = validation.positive_seconds(lease_timeout, "lease_timeout")
        poll = validation.positive_seconds(poll_interval, "poll_interval")
        if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
            raise InvalidParameter(f"1..64 worker threads, not {workers!r}", name="workers")
        if not isinstance(run_executors, bool):
            raise InvalidParameter("True or False", name="run_executors")
        if not isinstance(crashpoints, CrashPoints):
            raise InvalidParameter("a CrashPoints", name="crashpoints")
        return cls(
            host_id=host,
            state_dir=os.path.abspath(state_dir or default_state_dir(host)),
            run_executors=run_executors,
            lease_timeout=lease,
            poll_interval=poll,
            workers=workers,
            crashpoints=crashpoints,
        )


class Wiring:
    """One host's parts, and on connect each repository's, built from its config."""

    def __init__(self, config: EngineConfig, qemu: QemuImg | None = None) -> None:
        self.config = config
        self.qemu = qemu or QemuImg()
        self.repositories = HostRepositories()
        self._daemon: StorageDaemon | None = None
        # One handle for every thread: the daemon's monitor serves one client at a time.
        self._daemon_lock = threading.Lock()

    def daemon(self) -> StorageDaemon:
        """This host's storage daemon (docs/adr/0027), in its state dir; made on first use."""
        with self._daemon_lock:
            if self._daemon is None:
                self._make_state_dir()
                self._daemon = StorageDaemon(self.config.state_dir)
            return self._daemon

    def close_daemon(self) -> None:
        """Let go of the daemon, which keeps serving what it serves (the VMs outlive us)."""
        if self._daemon is not None:
            self._daemon.close()

    def connect(
        self,
        repo_id: str,
        repo_format: str,
        driver: type[RepositoryFormat],
        connection_parameters: Mapping[str, object],
    ) -> ConnectedRepository:
        """Open the repository, wire its parts, and register it under ``repo_id``."""
        return self.repositories.connect(
            repo_id,
            lambda: driver.open(connection_parameters),
            lambda storage: self._wire(repo_id, repo_format, storage),
        )

    def _wire(
        self, repo_id: str, repo_format: str, storage: RepositoryStorage
    ) -> ConnectedRepository:
        config = self.config
        # First, so that a second live process with this host id is refused before it does
        # anything (HostIdInUse), and a restart after a crash takes the id over at once.
        lease: HostLease | None
        try:
            lease = HostLease(
                storage.root,
                config.host_id,
                config.lease_timeout,
                runs_executors=config.run_executors,
            ).acquire()
        except OSError as e:
            if config.run_executors or e.errno not in _CANNOT_WRITE:
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
        config = self.config
        self._make_state_dir()
        app = StrataLogApplication(LogConfig(log_dir=storage.log_dir, host_id=config.host_id))
        try:
            service = ImageService(app, config.host_id)
            key = hashlib.sha256(os.path.realpath(storage.root).encode()).hexdigest()[:16]
            view = RepositoryView(app, db_path=os.path.join(config.state_dir, f"view-{key}.sqlite"))
            view.catch_up()
            log_follower = LogFollower(app.operation_log, poll_interval=config.poll_interval)
            follower = ViewFollower(view, log_follower, config.poll_interval).start()
            hosts = HostMonitor(
                storage.root,
                config.lease_timeout,
                refresh=min(config.poll_interval, config.lease_timeout / 8),
            )
            repo = ConnectedRepository(
                repo_id=repo_id,
                repo_format=repo_format,
                storage=storage,
                app=app,
                service=service,
                images=ImageHandlers(repo_id, service, view),
                view=view,
                follower=follower,
                live=LiveHandlers(repo_id, service, storage, view, self.daemon, self.qemu, hosts),
                lease=lease,
                hosts=hosts,
            )
            if config.run_executors:
                self._reconcile(repo)
                repo.executor = self._executor(service, view, storage, app, lease, hosts)
                repo.executor.start()
            return repo
        except BaseException:
            app.close()
            raise

    @staticmethod
    def _reconcile(repo: ConnectedRepository) -> None:
        """What the log says this host serves against what its daemon serves (docs/adr/0028);
        a daemon that cannot be asked now leaves the log as it is, for the next connect."""
        try:
            released = repo.live.reconcile(repo.view.images())
        except DaemonError as e:
            logger.warning("could not compare the attachments with the daemon: %s", e)
            return
        for image_id in released:
            logger.info(
                "image %s was attached here but the daemon no longer serves it: released",
                image_id, extra={"repository": repo.storage.root, "image": str(image_id)},
            )  # fmt: skip
        if released:
            repo.view.catch_up()

    def _executor(
        self,
        service: ImageService,
        view: RepositoryView,
        storage: RepositoryStorage,
        app: StrataLogApplication,
        lease: HostLease | None,
        hosts: HostMonitor,
    ) -> Executor:
        config, repositories = self.config, self.repositories
        return Executor(
            service,
            view,
            storage,
            self.qemu,
            host_id=config.host_id,
            find_image=repositories.find_for_executor,
            workers=config.workers,
            poll_interval=config.poll_interval,
            follower=LogFollower(app.operation_log, poll_interval=config.poll_interval),
            crashpoints=config.crashpoints,
            lease=lease,
            hosts=hosts,
            needed_elsewhere=lambda: repositories.needed_elsewhere(storage.root),
            foreign_ready=repositories.foreign_ready,
            daemon=self.daemon,
            repository_at=repositories.at_root,
        )

    def _make_state_dir(self) -> None:
        state_dir = self.config.state_dir
        if os.path.lexists(state_dir) and not os.path.isdir(state_dir):
            raise InvalidParameter(
                f"{state_dir} exists and is not a directory; give each host a directory "
                "of its own for its local caches",
                name="state_dir",
            )
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as e:
            raise storage_error(e, "Making this host's state directory", state_dir) from e
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise storage_error(
                OSError(errno.EACCES, "not writable by this process"),
                "Using this host's state directory",
                state_dir,
            )
