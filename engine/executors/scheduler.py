"""The executor of one repository on one host: claims the stages that can run and runs them.

Each pass catches the view up with the log and looks at every image whose current operation is
pending. Its next stage is claimed (``StageClaimed`` at the image's current version: of two
hosts, the log lets exactly one win) when

* the image is live, or the operation is a ``clean`` or ``merge`` (a removed image's own work
  is void; the space it holds is not), or a deep check's ``verify`` (on its carrier, ADR 0033);
* this Strata knows the stage kind (a newer host's stage waits for a newer host);
* nobody holds the claim, or this host does but no thread of this process runs it (this process
  is a restart after a crash: the stage runs again under a new epoch), or the host that holds
  it may be taken over (:meth:`Executor.may_take_over`: its heartbeat went silent for
  ``lease_timeout``, or it runs no executors);
* what the stage reads is ready (:func:`~engine.executors.stages.inputs_ready`);
* the image is attached to no host, or to this one (its stages then run live, through this
  host's storage daemon: engine/executors/live_stages.py), or to a host that may be taken over:
  that host died with its daemon, so the image is no longer attached (``AttachmentReleased``,
  appended with the claim) and the stage runs offline (docs/adr/0028); and a merge's stage
  rewrites no volume of another image attached on another host that may not be taken over.

A host whose own lease lapsed (it could not renew its heartbeat for ``lease_timeout``: storage
hung, or the process was stopped and resumed) may have been counted dead: it cancels the stages
it runs, claims nothing until its lease is fresh again, and then claims again what nobody took
(docs/adr/0005-executors-hosts-and-fencing.md).

A stage runs in a worker thread, one per image at a time, ``workers`` at most, and ends with
``StageCompleted`` or ``StageFailed`` (the error as a sentence) appended under its claim. A stage
whose operation was stopped (``FixStopped``) is cancelled, qemu-img killed, and records nothing.

A fault of the storage (a full or read-only filesystem, a log that cannot be appended to now)
stops nothing: the pass or the stage it hit ends, :attr:`Executor.fault` says why, and the next
pass tries again, so the executor resumes by itself once the fault is gone. A stage whose
outcome could not be recorded keeps this host's claim and runs again, as after a crash.
An unexpected error (a bug) is not to shrug off: it stops the executor, stays in
:attr:`Executor.errors`, and :meth:`Executor.stop` and :meth:`Executor.check` raise it as
:class:`~engine.errors.ExecutorFailed`.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``,
``engine.log``, ``engine.service``; the standard library.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from typing import Protocol

from engine.aggregates import operations as ops
from engine.aggregates.image import DigestRecord, Image
from engine.aggregates.operations import Operation
from engine.aggregates.stage_kinds import (
    Stage,
    changed_by,
    has_live_form,
    is_known,
    is_migration,
)
from engine.aggregates.work_rules import attached_holders, needed_volumes, will_run
from engine.errors import (
    ClaimLost,
    ConcurrencyConflict,
    ExecutorFailed,
    ImageNotFound,
    InvalidParameter,
    QemuCancelled,
    StageCancelled,
    StrataError,
    storage_error,
)
from engine.executors import crashpoints as points
from engine.executors import migration_stages
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.executors.progress import Claim, Lease
from engine.executors.stage_run import (
    DEFAULT_LOCK_WAIT,
    FindImage,
    ForeignReady,
    Live,
    RepositoryAt,
    StageRun,
    nowhere,
)
from engine.executors.stages import (
    chain_changes,
    inputs_ready,
    run_stage,
)
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.formats.repository.driver import RepositoryStorage
from engine.log.follow import LogFollower
from engine.service.attachments import dead_host
from engine.service.unit_of_work import ImageService

logger = logging.getLogger("engine.executors")


class ImageSource(Protocol):
    """What the executor reads of a repository's state (engine.projections.view provides it)."""

    def catch_up(self) -> object: ...
    def images(self) -> Iterable[Image]: ...
    def image(self, image_id: uuid.UUID, /) -> Image | None: ...
    def is_ready(self, volume_ref: str, /) -> bool: ...


class Hosts(Protocol):
    """What the executor knows of other hosts (engine.executors.liveness.HostMonitor)."""

    def may_take_over(self, host_id: str, /) -> bool: ...
    def expires_in(self, host_id: str, /) -> float: ...


class Executor:
    def __init__(
        self,
        service: ImageService,
        view: ImageSource,
        storage: RepositoryStorage,
        qemu: QemuImg,
        *,
        host_id: str,
        find_image: FindImage,
        workers: int = 2,
        poll_interval: float = 1.0,
        progress_interval: float = 1.0,
        follower: LogFollower | None = None,
        crashpoints: CrashPoints = DISARMED,
        lease: Lease | None = None,
        hosts: Hosts | None = None,
        lock_wait: float = DEFAULT_LOCK_WAIT,
        needed_elsewhere: Callable[[], Collection[str]] | None = None,
        foreign_ready: ForeignReady | None = None,
        daemon: Callable[[], StorageDaemon] | None = None,
        repository_at: RepositoryAt | None = None,
    ) -> None:
        """``follower`` (made here if None) belongs to the executor, which starts and stops it.
        ``lease`` is this host's liveness in the repository and ``hosts`` what it knows of the
        others'; without them no claim of another host is ever taken over.
        ``needed_elsewhere`` names the volumes here that work in other repositories reads (a
        removed image's work that makes them still runs); ``foreign_ready`` says whether a
        volume of another repository is made (see :func:`~engine.executors.stages.inputs_ready`).
        """
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise InvalidParameter(f"a whole number of 1 or more, not {workers!r}", name="workers")
        for name, value in (
            ("poll_interval", poll_interval),
            ("progress_interval", progress_interval),
        ):
            if not isinstance(value, int | float) or not 0 < value <= 60:
                raise InvalidParameter(f"seconds in (0, 60], not {value!r}", name=name)
        self.service = service
        self.view = view
        self.storage = storage
        self.qemu = qemu
        self.host_id = host_id
        self.find_image = find_image
        self.workers = workers
        self.poll_interval = float(poll_interval)
        self.progress_interval = float(progress_interval)
        self.crashpoints = crashpoints
        self.lease = lease
        self.hosts = hosts
        self.lock_wait = float(lock_wait)
        self.needed_elsewhere = needed_elsewhere
        self.foreign_ready = foreign_ready
        self.daemon = daemon
        self.repository_at: RepositoryAt = repository_at or nowhere
        self.errors: list[BaseException] = []
        self.fault: StrataError | None = None  # the last storage fault a pass or stage met
        self._follower = follower or LogFollower(
            service.app.operation_log, poll_interval=self.poll_interval
        )
        self._lock = threading.Lock()
        self._running: dict[uuid.UUID, Claim] = {}  # by image: one stage per image at a time
        self._threads: dict[uuid.UUID, threading.Thread] = {}
        self._stopping = threading.Event()
        self._loop: threading.Thread | None = None
        # Seconds until the first claim this host waits on could be taken over (None: none).
        self._next_expiry: float | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Executor:
        if self._loop is not None or self._stopping.is_set():
            raise InvalidParameter("an executor starts once", name="start")
        self._follower.start()
        self._loop = threading.Thread(target=self._run_loop, name="strata-executor", daemon=True)
        self._loop.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Claim nothing more; let running stages finish for up to ``timeout`` seconds, then
        cancel the rest (qemu-img is killed at its next progress report). A cancelled stage
        keeps this host's claim and its temporary file: this host's next executor runs it again
        from scratch, as after a crash. Raises ExecutorFailed if the executor had failed."""
        self._stopping.set()
        self._follower.stop()  # also releases the loop from its wait
        if self._loop is not None:
            self._loop.join()
        deadline = time.monotonic() + max(0.0, timeout)
        for thread in self._live_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        for claim in self._claims():
            claim.cancel.set()
        for thread in self._live_threads():
            thread.join(max(timeout, 5.0))
        self.check()

    def check(self) -> None:
        """Raise the first unexpected error that stopped the executor, if one did."""
        if self.errors:
            raise ExecutorFailed(str(self.errors[0]), host_id=self.host_id) from self.errors[0]

    def busy(self) -> bool:
        """Whether a stage is running on this host now."""
        with self._lock:
            return bool(self._running)

    def run_once(self) -> int:
        """Claim and run, in this thread, every stage that can run, pass after pass until none
        is left (a stage that ends may let the next one run); return how many ran."""
        if self._loop is not None:
            raise InvalidParameter("run_once is for an executor that was not started", name="run")
        ran = 0
        while True:
            self.view.catch_up()
            batch = 0
            for image, op in self._candidates():
                claim = self._claim(image, op)
                if claim is not None:
                    self._track(claim)
                    try:
                        self._run(claim)
                    finally:
                        self._untrack(claim)
                    batch += 1
            if batch == 0:
                return ran
            ran += batch

    # --- the loop -------------------------------------------------------------------------

    def _run_loop(self) -> None:
        log = self.service.app.operation_log
        try:
            while not self._stopping.is_set() and not self.errors:
                seen = log.last_seq
                self._next_expiry = None
                try:
                    self._schedule()
                except (StrataError, OSError) as e:
                    self._met(e)
                    self._stopping.wait(self.poll_interval)  # not a spin while it lasts
                    continue
                if self.fault is not None:
                    logger.info(
                        "executor of host %s works again after: %s",
                        self.host_id, self.fault,
                        extra={"repository": self.storage.root, "host": self.host_id},
                    )  # fmt: skip
                    self.fault = None
                # Wake when a silent host's claim can be taken over, not up to a poll later.
                wait = self.poll_interval
                if self._next_expiry is not None:
                    wait = min(wait, self._next_expiry + 0.01)
                self._follower.wait(seen, wait)
        except BaseException as e:
            self._failed(e)

    def _met(self, fault: StrataError | OSError) -> None:
        typed = fault if isinstance(fault, StrataError) else storage_error(fault, "Working")
        if self.fault is None or self.fault.code != typed.code:
            logger.warning(
                "executor of host %s waits out a fault of the storage, retrying every %.1f s: %s",
                self.host_id, self.poll_interval, typed,
                extra={"repository": self.storage.root, "host": self.host_id, "code": typed.code},
            )  # fmt: skip
        self.fault = typed

    def _schedule(self) -> None:
        self.view.catch_up()
        self._cancel_moved_on()
        if not self._lease_holds():
            return
        for image, op in self._candidates():
            if self._stopping.is_set() or len(self._claims()) >= self.workers:
                return
            claim = self._claim(image, op)
            if claim is not None:
                thread = threading.Thread(
                    target=self._work, args=(claim,), name=f"strata-{image.id}", daemon=True
                )
                self._track(claim, thread)
                thread.start()

    def _work(self, claim: Claim) -> None:
        try:
            self._run(claim)
        except (StrataError, OSError) as e:
            # Its outcome could not be recorded (the log is full or read-only): the claim
            # stays this host's, and a later pass runs the stage again once the log works.
            self._met(e)
        except BaseException as e:
            self._failed(e)
        finally:
            self._untrack(claim)

    def _cancel_moved_on(self) -> None:
        """Cancel running stages that the log says were stopped, superseded or taken over."""
        for claim in self._claims():
            image = self.view.image(claim.image_id)
            op = None if image is None else image.operation(claim.op_id)
            if op is not None and (
                op.state in (ops.STOPPED, ops.DONE)
                or op.done > claim.index
                or op.claim_epoch > claim.epoch
            ):
                claim.cancel.set()

    def _lease_holds(self) -> bool:
        """Whether this host may claim now. After a lapse every running stage is cancelled:
        they were claimed in an earlier term, and may have been taken over meanwhile."""
        if self.lease is None:
            return True
        term = self.lease.term()
        for claim in self._claims():
            if claim.term != term:
                claim.cancel.set()
        return self.lease.fresh()

    # --- choosing and claiming ------------------------------------------------------------

    def _candidates(self) -> list[tuple[Image, Operation]]:
        with self._lock:
            running = set(self._running)
        found = []
        needed: list[Collection[str]] = []  # worked out once a pass, if a removed image asks
        for image in self.view.images():
            op = None if image.id in running else self._next(image, needed)
            if op is not None and inputs_ready(
                op.stages[op.done],
                self.view.is_ready,
                self.storage,
                self.find_image,
                self.foreign_ready,
                self.repository_at,
            ):
                found.append((image, op))
        return found

    def _next(self, image: Image, needed: list[Collection[str]] | None = None) -> Operation | None:
        """The operation whose next stage this host may claim, if any. ``needed`` caches what
        the volumes needed are, for a pass over every image."""
        op = image.current_operation()
        if op is None or op.state != ops.PENDING or op.done >= len(op.stages):
            return None
        # Only a removed image needs to know what others need (what it still makes for them).
        wanted: Collection[str] = frozenset()
        if image.removed and op.purpose not in (ops.CLEAN, ops.MERGE):
            if needed is None:
                needed = []
            if not needed:
                needed.append(self._needed())
            wanted = needed[0]
        if not will_run(image, op, wanted):
            return None
        if not is_known(op.stages[op.done]):
            return None
        attached = image.attached_on
        if attached == self.host_id and not has_live_form(op.stages[op.done]):
            return None  # it would change what the daemon serves behind its back: after detach
        if attached not in (None, self.host_id) and not self._dead(image):
            return None  # live work, for the host that serves the image
        if op.purpose == ops.MERGE and self._served_elsewhere(image, op.stages[op.done]):
            return None  # it rewrites a volume of another image, served by another host
        if op.claim_host not in (None, self.host_id) and not self.may_take_over(image, op):
            if self.hosts is not None:
                expiry = self.hosts.expires_in(op.claim_host)
                if self._next_expiry is None or expiry < self._next_expiry:
                    self._next_expiry = expiry
            return None
        return op

    def _served_elsewhere(self, image: Image, stage: Stage) -> bool:
        """Whether the stage rewrites a volume in the chain of another image that a host alive
        serves. A merge rewrites the volumes of every chain through the merged one, and is
        queued on an attached one when it is planned; another may be attached since."""
        ref = changed_by(stage)
        return ref is not None and any(
            other.id != image.id and other.attached_on != self.host_id and not self._dead(other)
            for other in attached_holders(self.view.images(), ref)
        )

    def _dead(self, image: Image) -> bool:
        """Whether the host serving ``image`` may be taken over (its daemon died with it)."""
        host = image.attached_on
        return host is not None and self.hosts is not None and self.hosts.may_take_over(host)

    def may_take_over(self, image: Image, op: Operation) -> bool:
        """Whether another host's claim on ``op`` may be taken over: that host's heartbeat
        has been silent for ``lease_timeout`` (it counts as dead), it disconnected, or it came
        back without executors. Its later appends under the old claim are then refused
        (ClaimLost), and what it writes lands in files tagged with its old epoch."""
        return (
            self.hosts is not None
            and op.claim_host is not None
            and self.hosts.may_take_over(op.claim_host)
        )

    def _needed(self) -> set[str]:
        elsewhere = () if self.needed_elsewhere is None else self.needed_elsewhere()
        return needed_volumes(self.view.images(), elsewhere)

    def _claim(self, seen: Image, seen_op: Operation) -> Claim | None:
        image_id, op_id, index = seen.id, seen_op.op_id, seen_op.done

        # Read before the append: a lapse between the two makes the claim look older, not newer.
        term = 0 if self.lease is None else self.lease.term()

        def command(image: Image) -> Claim | None:
            # Decided again on the image as the log holds it now, not as the view saw it.
            op = self._next(image)
            if op is None or op.op_id != op_id or op.done != index:
                return None
            now = self.service.now()
            attached = image.attached_on
            if attached not in (None, self.host_id):
                image.release_attachment(
                    of_host=attached,
                    reason=dead_host(attached),
                    host_id=self.host_id,
                    now=now,
                )
            holder = op.claim_host
            epoch = image.claim(
                op_id=op_id,
                stage=index,
                host_id=self.host_id,
                now=now,
                take_over=holder if holder not in (None, self.host_id) else None,
            )
            stage = op.stages[index].copy()
            return Claim(
                self.service,
                self.host_id,
                image_id,
                op_id,
                index,
                epoch,
                stage,
                lease=self.lease,
                term=term,
                crashpoints=self.crashpoints,
                phase=op.phase,
            )

        self.crashpoints(points.BEFORE_CLAIM)
        try:
            claim = self.service.update(image_id, command)
        except (ClaimLost, ConcurrencyConflict):
            return None  # another host was quicker
        if claim is not None:
            self.crashpoints(points.AFTER_CLAIM)
            holder = seen_op.claim_host
            if holder not in (None, self.host_id):
                logger.info(
                    "host %s takes over stage %d of operation %s on image %s from host %s",
                    self.host_id, index + 1, op_id, image_id, holder,
                    extra=_context(claim, self.host_id, self.storage.root),
                )  # fmt: skip
        return claim

    # --- running --------------------------------------------------------------------------

    def _run(self, claim: Claim) -> None:
        run = StageRun(
            claim.image_id,
            claim.op_id,
            claim.index,
            claim.epoch,
            claim.stage,
            self.storage,
            self.qemu,
            self.find_image,
            claim.progress(self.progress_interval),
            self.crashpoints,
            cancel=claim.cancel,
            confirm=claim.confirm,
            superseded=claim.superseded,
            moved_on=claim.moved_on,
            lock_wait=self.lock_wait,
            phase=claim.phase,
            live=self._live(claim),
            repository_at=self.repository_at,
            checkpoint=claim.checkpoint,
            last_checkpoint=claim.last_checkpoint,
            keep_digest=claim.keep_digest,
            recorded_digest=self._recorded_digest,
            local_image=self.view.image,
        )
        try:
            self.crashpoints(points.BEFORE_DATA)
            run_stage(run, migration_stages.execute)
            changes = chain_changes(claim.stage)
        except (StageCancelled, QemuCancelled):
            return  # stopped, or claimed elsewhere: there is no outcome of ours to record
        except (StrataError, OSError) as e:
            why = e.message if isinstance(e, StrataError) else str(e)
            logger.warning(
                "stage %d of operation %s on image %s failed on host %s: %s",
                claim.index + 1, claim.op_id, claim.image_id, self.host_id, why,
                extra=_context(claim, self.host_id, self.storage.root),
            )  # fmt: skip
            claim.fail(why)
            return
        except Exception as e:
            claim.fail(f"internal error: {type(e).__name__}: {e}")
            raise  # a bug: the image shows it, and the executor stops on it
        self.crashpoints(points.AFTER_DATA)
        try:
            claim.complete(changes, drop_volume=claim.stage.get("drop_volume"), damage=run.found)
        except ImageNotFound as e:  # chain_changes names an image this log does not hold
            claim.fail(e.message)
            return
        self.crashpoints(points.AFTER_COMPLETION)

    def _live(self, claim: Claim) -> Live | None:
        """How the stage runs live, if the volume it changes is in the chain of an image that
        this host's daemon serves: its own image first, else (a merge) another one's."""
        if self.daemon is None:
            return None
        if is_migration(claim.stage):
            # It works through the export of the image itself (docs/adr/0029).
            own = self.view.image(claim.image_id)
            if own is not None and own.attached_on == self.host_id:
                return Live(self.daemon(), own, claim.reach)
            return None
        ref = changed_by(claim.stage)
        if ref is None:
            return None
        own = self.view.image(claim.image_id)
        images = (own, *self.view.images())
        for image in attached_holders(images, ref):
            if image.attached_on == self.host_id:
                return Live(self.daemon(), image, claim.reach)
        stage = claim.stage
        if (
            own is not None
            and own.attached_on == self.host_id
            and stage["do"] == "create"
            and stage.get("backing") == own.chain[-1]
        ):
            # A new top that only the stage's completion puts in the chain (a migration's
            # live snapshot, docs/adr/0029): a live snapshot of the image all the same.
            return Live(self.daemon(), own, claim.reach)
        return None

    def _recorded_digest(self, ref: str) -> DigestRecord | None:
        """The digest this repository's log holds for volume ``ref`` on a live image: one on a
        removed snapshot is not lent, since a block job may have committed into its volume
        once nothing else read it, and its record then describes bytes that are gone."""
        for image in self.view.images():
            record = None if image.removed else image.digests.get(ref)
            if record is not None:
                return record
        return None

    # --- bookkeeping ----------------------------------------------------------------------

    def _track(self, claim: Claim, thread: threading.Thread | None = None) -> None:
        with self._lock:
            self._running[claim.image_id] = claim
            if thread is not None:
                self._threads[claim.image_id] = thread

    def _untrack(self, claim: Claim) -> None:
        with self._lock:
            self._running.pop(claim.image_id, None)
            self._threads.pop(claim.image_id, None)

    def _claims(self) -> list[Claim]:
        with self._lock:
            return list(self._running.values())

    def _live_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads.values())

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self.errors.append(error)


def _context(claim: Claim, host_id: str, repository: str) -> dict[str, object]:
    """The structured fields of a log line about a stage (``extra=`` of logging, ADR 0026)."""
    return {
        "repository": repository,
        "host": host_id,
        "image": str(claim.image_id),
        "operation": claim.op_id,
        "stage": claim.index + 1,
    }
