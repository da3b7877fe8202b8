"""A repository connected on this host: its storage, its log application, its view, its
commands, its work, and this host's lease on its host id there (engine/executors/liveness.py).
engine/bootstrap.py builds one on connect; engine/host_repositories.py keeps them by name.

Also the thread that keeps the view current: it wakes on this process's appends at once and on
other hosts' within the poll interval (:class:`~engine.log.follow.LogFollower`), folds the new
records into the view, and wakes whoever waits for an image (``wait_for_image``).

Imports: the parts it holds: :mod:`engine.application`, :mod:`engine.log`, the view
(:mod:`engine.projections.view`), the service layer, the executors' types, the repository
format's interface and :mod:`engine.errors`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.application import StrataLogApplication
from engine.errors import StrataError, storage_error
from engine.formats.repository.driver import RepositoryStorage
from engine.log.follow import LogFollower
from engine.projections.view import RepositoryView
from engine.service.image_handlers import ImageHandlers
from engine.service.live_handlers import LiveHandlers
from engine.service.unit_of_work import ImageService

logger = logging.getLogger("engine")

if TYPE_CHECKING:
    from engine.executors.liveness import HostLease, HostMonitor
    from engine.executors.scheduler import Executor


class ViewFollower:
    """Keeps a view caught up with its log, and tells waiters when it moved."""

    def __init__(self, view: RepositoryView, follower: LogFollower, poll_interval: float) -> None:
        self._view = view
        self._follower = follower
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self.changed = threading.Condition()
        self.error: BaseException | None = None  # a bug that stopped the thread
        # The last storage fault that kept the view from catching up (None once it did):
        # reads go on answering from the view meanwhile, and the thread keeps trying.
        self.fault: StrataError | None = None
        self._thread = threading.Thread(target=self._run, name="strata-view", daemon=True)

    def start(self) -> ViewFollower:
        self._follower.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._follower.wait(self._view.position, self._poll_interval)
                if self._stop.is_set():
                    return
                self.caught_up()
                if self.fault is not None:
                    self._stop.wait(self._poll_interval)  # the storage is failing: not a spin
        except Exception as e:  # a bug: surfaced by check() on the caller's next request
            self.error = e
            with self.changed:
                self.changed.notify_all()

    def caught_up(self) -> int:
        """Fold what the log holds now; return the view's position. A fault of the storage
        (a log that cannot be read now, a read model that cannot be written) leaves the view
        where it was, answering reads, and is kept in :attr:`fault` until a catch-up works:
        a call whose events are committed must not fail because the view lags behind."""
        try:
            position = self._view.catch_up()
        except (StrataError, OSError) as e:
            typed = e if isinstance(e, StrataError) else storage_error(e, "Reading the log")
            if self.fault is None or self.fault.code != typed.code:
                logger.warning(
                    "the view stays at position %d and answers from there: %s",
                    self._view.position, typed, extra={"code": typed.code},
                )  # fmt: skip
            self.fault = typed
            position = self._view.position
        else:
            if self.fault is not None:
                logger.info("the view follows the log again, at position %d", position)
            self.fault = None
        with self.changed:
            self.changed.notify_all()
        return position

    def check(self) -> None:
        """Raise what stopped the follower, so a view never falls behind silently."""
        if self.error is not None:
            raise self.error

    def wait_for_change(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._follower.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self.changed:  # waiters look again, and find the repository gone
            self.changed.notify_all()


@dataclass
class ConnectedRepository:
    repo_id: str
    repo_format: str
    storage: RepositoryStorage
    app: StrataLogApplication
    service: ImageService
    images: ImageHandlers
    view: RepositoryView
    follower: ViewFollower
    live: LiveHandlers
    lease: HostLease | None = None
    hosts: HostMonitor | None = None
    executor: Executor | None = None
    # Volumes the last check found missing, damaged or foreign, each with its file's (inode,
    # mtime) then, or None if it had none: a status says so while the file is still that one
    # (engine/volume_health.py). Re-derivable from the files themselves.
    lost: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    # qcow2 volumes the last checks found sound, by file identity: not read again unchanged.
    sound_headers: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def close(self) -> None:
        """Stop the executor first, then say this host left (its remaining claims can be
        taken over at once), then stop following and close the log."""
        try:
            if self.executor is not None:
                self.executor.stop()
        finally:
            try:
                if self.lease is not None:
                    self.lease.release()
            finally:
                self.follower.stop()
                self.view.close()
                self.app.close()
