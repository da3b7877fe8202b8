"""The storage daemon's block jobs: stream (pull), commit, and what is done to a running job.

:class:`BlockJobs` is the part of :class:`~engine.formats.qemu.storage_daemon.StorageDaemon` that
starts and drives QEMU block jobs (docs/adr/0028, "The adapter's jobs"); it only needs the
daemon's ``_execute``.

Every job is started with ``auto-dismiss: false``, so that an outcome reached while the engine was
down is still there to read (``query-jobs`` shows it ``concluded``, with its ``error``) until the
engine dismisses it; and with ``auto-finalize: true``. **Never** ``auto-finalize: false``: in QEMU
7.2 an active commit that waits in ``pending`` does not stop the guest's writes, and a write made
while pending is lost when the job is finalized (measured here).

A ready active commit (or mirror) ends one of two ways: ``complete_job`` pivots the chain to the
base; ``cancel_job`` (``block-job-cancel``) leaves the chain as it was. Without ``force`` a ready
job concludes without an error (the base holds a full copy, nobody uses it); with ``force``, or
before ``ready``, it concludes with the error ``Operation canceled``. Either way the chain's
content is intact, since the top still holds every write. The generic ``job-cancel`` always
forces.

Job ids are the caller's, like node names: QEMU needs a letter first; at most 31 characters here.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Collection
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from engine.errors import DaemonError, InvalidParameter

_JOB_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")


@dataclass(frozen=True)
class Job:
    """A block job, as ``query-jobs`` reports it (progress in bytes; ``error`` once failed).

    ``status`` is QEMU's: created, running, paused, ready, standby, waiting, pending, aborting,
    concluded, null. ``speed`` is the job's limit in bytes/s from ``query-block-jobs`` (0:
    unlimited, or the job is no longer listed there, as a concluded one is not).
    """

    id: str
    type: str
    status: str
    current_progress: int
    total_progress: int
    error: str | None
    speed: int = 0


class BlockJobs:
    """Block jobs on the daemon's nodes; mixed into the daemon handle, which supplies
    ``_execute`` (one QMP command, every refusal a :class:`DaemonError`) and ``_socket``."""

    def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    @property
    def _socket(self) -> str:
        raise NotImplementedError

    # --- starting jobs ---------------------------------------------------------------------
    def stream(
        self,
        job_id: str,
        node: str,
        *,
        base_node: str | None,
        backing_file: str | None,
        speed: int = 0,
    ) -> None:
        """Pull into ``node`` what lies below it, down to ``base_node`` (exclusive) or all of it.

        ``backing_file`` is the relative name written into ``node``'s header at the end (only
        with a base: a full pull leaves no backing file). The volumes pulled stay open as nodes
        of their own, out of the chain, for the caller to remove.
        """
        arguments = _job_arguments(job_id, speed)
        arguments["device"] = node
        if base_node is not None:
            arguments["base-node"] = base_node
        if backing_file is not None:
            arguments["backing-file"] = backing_file
        self._execute("block-stream", arguments)

    def commit(
        self,
        job_id: str,
        device: str,
        *,
        top_node: str,
        base_node: str,
        backing_file: str | None,
        speed: int = 0,
    ) -> None:
        """Merge ``top_node`` and everything down to ``base_node`` into ``base_node``.

        ``device`` is the chain's active node. With ``top_node == device`` (an active commit)
        the job goes ``ready`` and waits for :meth:`complete_job` (pivot) or :meth:`cancel_job`;
        otherwise it ends by itself and ``backing_file`` is the relative name written into the
        header of the volume above ``top_node``. The base must be writable: reopen it first
        (QEMU 7.2 refuses a read-only one).
        """
        arguments = _job_arguments(job_id, speed)
        arguments.update({"device": device, "top-node": top_node, "base-node": base_node})
        if backing_file is not None:
            arguments["backing-file"] = backing_file
        self._execute("block-commit", arguments)

    def mirror(self, job_id: str, device: str, *, target_node: str, speed: int = 0) -> None:
        """Copy what ``device`` holds above its backing into ``target_node`` (``sync: top``)
        and from then on every write to both (``copy-mode: write-blocking``: a write completes
        once it is on both sides), until :meth:`complete_job` switches ``device``'s users to
        the target or :meth:`cancel_job` stops it (docs/adr/0029).

        The target is opened by the caller; QEMU leaves its backing link as it is
        (``blockdev-mirror`` does not set it): the caller links the target's backing before
        the switch, or the target reads zeros below what it holds.
        """
        arguments = _job_arguments(job_id, speed)
        arguments.update(
            {"device": device, "target": target_node, "sync": "top", "copy-mode": "write-blocking"}
        )
        self._execute("blockdev-mirror", arguments)

    # --- driving them ----------------------------------------------------------------------
    def complete_job(self, job_id: str) -> None:
        """Finish a ``ready`` job: an active commit pivots its chain's users to the base."""
        self._execute("job-complete", {"id": _job_id(job_id)})

    def cancel_job(self, job_id: str, *, force: bool = False) -> None:
        """Stop a job, leaving the chain as it was (see the module's note on ready jobs)."""
        self._execute("block-job-cancel", {"device": _job_id(job_id), "force": force})

    def dismiss_job(self, job_id: str) -> None:
        """Forget a ``concluded`` job (what ``auto-dismiss: false`` keeps until read)."""
        self._execute("job-dismiss", {"id": _job_id(job_id)})

    def stop_job(self, job_id: str, *, timeout: float = 60.0) -> None:
        """Cancel a job gently, wait for its end and forget it, whatever state it is in (one
        that is gone is stopped). Never forced: a forced cancel of a write-blocking mirror
        failed a guest write in flight with EIO (5 aborts in 44 under writes, none in 48
        gently, QEMU 7.2); a ready mirror cancelled gently ends with its copy unused."""
        with suppress(DaemonError):
            self.cancel_job(job_id)
        with suppress(DaemonError):
            self.wait_job(job_id, ("concluded",), timeout=timeout)
        with suppress(DaemonError):
            self.dismiss_job(job_id)

    def set_speed(self, job_id: str, speed: int) -> None:
        """Limit a running job to ``speed`` bytes/s (0: unlimited)."""
        self._execute("block-job-set-speed", {"device": _job_id(job_id), "speed": _speed(speed)})

    # --- reading them ----------------------------------------------------------------------
    def query_jobs(self) -> list[Job]:
        speeds = {j["device"]: j["speed"] for j in self._execute("query-block-jobs")}
        return [
            Job(
                j["id"],
                j["type"],
                j["status"],
                j["current-progress"],
                j["total-progress"],
                j.get("error"),
                speeds.get(j["id"], 0),
            )
            for j in self._execute("query-jobs")
        ]

    def find_job(self, job_id: str) -> Job | None:
        _job_id(job_id)
        return next((job for job in self.query_jobs() if job.id == job_id), None)

    def wait_job(
        self,
        job_id: str,
        statuses: Collection[str],
        *,
        timeout: float,
        cancel: threading.Event | None = None,
        poll: float = 0.05,
    ) -> Job:
        """Poll until the job's status is one of ``statuses`` or ``concluded`` and return it.

        When ``cancel`` is set, returns the job as it is then (the caller decides). A job that
        is not there, or not there any more, is a :class:`DaemonError` (``DeviceNotFound``), and
        so is the timeout (``error_class`` None, as for any answer that did not come).
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.find_job(job_id)
            if job is None:
                raise self._query_error("DeviceNotFound", f"no job {job_id}")
            if job.status in statuses or job.status == "concluded":
                return job
            if cancel is not None and cancel.is_set():
                return job
            if time.monotonic() >= deadline:
                raise self._query_error(None, f"job {job_id} still {job.status} after {timeout} s")
            if cancel is not None:
                cancel.wait(poll)
            else:
                time.sleep(poll)

    def _query_error(self, error_class: str | None, desc: str) -> DaemonError:
        return DaemonError(
            command="query-jobs", error_class=error_class, desc=desc, socket=self._socket
        )


def _job_arguments(job_id: str, speed: int) -> dict[str, Any]:
    return {
        "job-id": _job_id(job_id),
        "speed": _speed(speed),
        "auto-dismiss": False,
        "auto-finalize": True,  # never False: see the module's docstring
    }


def _job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise InvalidParameter(
            f"a letter, then letters, digits, '-', '.' or '_', at most 31 characters, "
            f"not {job_id!r}",
            name="job_id",
        )
    return job_id


def _speed(speed: int) -> int:
    if speed < 0:
        raise InvalidParameter(f"bytes per second, 0 for no limit, not {speed}", name="speed")
    return speed
