"""Every error Strata raises on purpose, rooted at :class:`StrataError` (architecture §7).

Each class has a stable ``code`` (callers and the command line key on it, so a code is never
reused or renamed), declares its fields as typed attributes in ``__init__``, and builds its
message from them (``template`` names them as ``{self.field}``), so that a caller can both show a
sentence to a person and act on the fields. A field the raiser cannot know is ``None``, never a
placeholder. Third-party errors are translated at the boundary with ``raise ... from e``
(engine/boundary.py).

Imports: the standard library only; every layer may import this module.
"""

from __future__ import annotations

import errno
import re
import uuid
from typing import Any, ClassVar

ImageId = uuid.UUID | str  # an aggregate's id, or the id a caller passed


class StrataError(Exception):
    """Base of every error the engine raises on purpose.

    ``detail`` says what happened in this instance; a subclass sets its own attributes before
    it calls ``super().__init__(detail)``, which builds the message from them.
    """

    code: ClassVar[str] = "strata_error"
    template: ClassVar[str] = "{self.detail}"
    # The number VDSM's storage API gives the same refusal (seed 003), for callers that speak
    # it; None where VDSM has no such error.
    vdsm_code: ClassVar[int | None] = None

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return self.template.format(self=self)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """``code``, ``message`` and the typed fields, as JSON can hold them."""
        fields = {
            name: value
            for name, value in vars(self).items()
            if name != "detail" and not name.startswith("_")
        }
        said = {"code": self.code, "message": self.message, **_plain(fields)}
        if self.vdsm_code is not None:
            said["vdsm_code"] = self.vdsm_code
        return said


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | None) else str(v)
        for k, v in fields.items()
    }


# --- input ----------------------------------------------------------------------------------


class InvalidParameter(StrataError):
    code = "invalid_parameter"
    template = "Invalid {self.name}: {self.detail}"

    def __init__(self, detail: str, *, name: str) -> None:
        self.name = name
        super().__init__(detail)


# --- the log --------------------------------------------------------------------------------


class LogError(StrataError):
    code = "log_error"


class NotAStrataLog(LogError):
    code = "not_a_strata_log"
    template = (
        "{self.path} is not a Strata log ({self.detail}); point the tool at a repository "
        "directory or its log/ directory"
    )

    def __init__(self, detail: str, *, path: str) -> None:
        self.path = path
        super().__init__(detail)


class UnsupportedLogVersion(LogError):
    code = "unsupported_log_version"
    template = (
        "{self.path} uses log format version {self.version}, this Strata reads versions up to "
        "{self.supported}; upgrade Strata on this host before touching this repository"
    )

    def __init__(self, *, path: str, version: int, supported: int) -> None:
        self.path = path
        self.version = version
        self.supported = supported
        super().__init__()


class LogCorrupted(LogError):
    """The log is damaged at byte ``offset`` of segment number ``segment``."""

    code = "log_corrupted"
    template = (
        "Log damaged in segment {self.segment} at byte offset {self.offset}: {self.detail}. "
        "Nothing after this point was read; restore the segment from a replica or backup, then "
        "run 'strata-log verify'"
    )

    def __init__(self, detail: str, *, segment: int, offset: int) -> None:
        self.segment = segment
        self.offset = offset
        super().__init__(detail)


class ConcurrencyConflict(LogError):
    """An append was refused because the aggregate changed since the caller read it.

    The log names the aggregate and both versions; a conflict reported by the event-sourcing
    library without them has them ``None`` and says what the library said in ``detail``.
    """

    code = "concurrency_conflict"
    template = (
        "Aggregate {self.originator_id} is at version {self.current}, the append expected to "
        "write version {self.attempted}; re-read it and retry"
    )

    def __init__(
        self,
        detail: str = "",
        *,
        originator_id: ImageId | None = None,
        current: int | None = None,
        attempted: int | None = None,
    ) -> None:
        self.originator_id = originator_id
        self.current = current
        self.attempted = attempted
        super().__init__(detail)

    @property
    def message(self) -> str:
        if self.originator_id is None or self.current is None or self.attempted is None:
            return f"An aggregate changed since it was read ({self.detail}); re-read it and retry"
        return super().message


class LogClosed(LogError):
    code = "log_closed"
    template = "The log at {self.path} is closed"

    def __init__(self, *, path: str) -> None:
        self.path = path
        super().__init__()


class CommitUnknown(LogError):
    """A write of the log failed in a way that leaves unknown whether it reached the disk."""

    code = "commit_unknown"
    template = (
        "Whether the append to the log at {self.path} was committed is unknown "
        "({self.detail}); the next append or a reconnect reads the log and settles it. "
        "Retrying the same call with the same arguments is safe"
    )

    def __init__(self, detail: str, *, path: str) -> None:
        self.path = path
        super().__init__(detail)


class LogMissing(LogError):
    """The log directory (or its last segment) was removed or replaced under a running host."""

    code = "log_missing"
    template = (
        "The log at {self.path} was removed or replaced while this host had it open "
        "({self.detail}); nothing was appended. Restore the repository's log, then disconnect "
        "and connect the repository again"
    )

    def __init__(self, detail: str, *, path: str) -> None:
        self.path = path
        super().__init__(detail)


# --- the storage under the engine -----------------------------------------------------------


class StorageError(StrataError):
    """The operating system refused a file operation in a repository or the state directory.

    ``errno`` is the operating system's error number (0 when SQLite refused), ``path`` the file
    concerned, ``doing`` what the engine was doing there.
    """

    code = "storage_error"
    template = "{self.doing} {self.path} failed: {self.detail}; check the storage and retry"

    def __init__(self, detail: str, *, doing: str, path: str, errno: int) -> None:
        self.doing = doing
        self.path = path
        self.errno = errno
        super().__init__(detail)


class StorageFull(StorageError):
    code = "storage_full"
    template = (
        "{self.doing} {self.path} failed: the filesystem is full. Free space there: calls and "
        "executors resume by themselves, and the check offers fixes for work that failed"
    )


class StorageReadOnly(StorageError):
    code = "storage_read_only"
    template = (
        "{self.doing} {self.path} failed: the filesystem is read-only. Make it writable again: "
        "calls and executors resume by themselves, and the check offers fixes for work that "
        "failed"
    )


class PermissionDenied(StorageError):
    code = "permission_denied"
    template = (
        "{self.doing} {self.path} failed: permission denied; give this host's user access to "
        "the repository (or the state directory) and retry"
    )


_BY_ERRNO: dict[int, type[StorageError]] = {
    errno.ENOSPC: StorageFull,
    errno.EDQUOT: StorageFull,
    errno.EROFS: StorageReadOnly,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
}


def storage_error(e: OSError, doing: str, path: str | None = None) -> StorageError:
    """The typed error for an operating system error ``e`` met while ``doing`` ``path``
    (raise it ``from e``)."""
    cls = _BY_ERRNO.get(e.errno or 0, StorageError)
    where = path if path is not None else (str(e.filename) if e.filename is not None else "")
    return cls(e.strerror or str(e), doing=doing, path=where, errno=e.errno or 0)


def sqlite_error(e: Exception, doing: str, path: str) -> StorageError:
    """The typed error for SQLite's error ``e`` on this host's local read model at ``path``."""
    text = str(e)
    lowered = text.lower()
    if "full" in lowered:
        cls: type[StorageError] = StorageFull
    elif "readonly" in lowered or "read-only" in lowered:
        cls = StorageReadOnly
    else:
        cls = StorageError
    return cls(text, doing=doing, path=path, errno=0)


class InternalError(StrataError):
    """Something the engine did not expect (a bug): the cause is chained to it."""

    code = "internal_error"
    template = (
        "{self.doing} failed on an unexpected error, a bug in Strata: {self.detail}; the log "
        "holds whatever was committed before it. Report it with this message"
    )

    def __init__(self, detail: str, *, doing: str) -> None:
        self.doing = doing
        super().__init__(detail)


# --- the eventsourcing boundary -------------------------------------------------------------


class NotSupported(StrataError):
    """An eventsourcing feature that Strata's persistence refuses rather than fakes."""

    code = "not_supported"
    template = "{self.feature} is not supported by Strata's persistence: {self.detail}"

    def __init__(self, detail: str, *, feature: str) -> None:
        self.feature = feature
        super().__init__(detail)


# --- repositories ---------------------------------------------------------------------------


class UnknownRepositoryFormat(StrataError):
    code = "unknown_repository_format"
    template = "Unknown repository format {self.name!r}; this Strata knows: {self.known}"

    def __init__(self, *, name: object, known: str) -> None:
        self.name = name  # what the caller passed, maybe not even a string
        self.known = known
        super().__init__()


class NotARepository(StrataError):
    code = "not_a_repository"
    template = (
        "{self.path} is not a Strata repository ({self.detail}); check the path, or format an "
        "empty directory with create_storage_repository"
    )

    def __init__(self, detail: str, *, path: str) -> None:
        self.path = path
        super().__init__(detail)


class RepositoryFormatMismatch(StrataError):
    code = "repository_format_mismatch"
    template = (
        "{self.path} holds a repository whose marker says {self.found!r}, not "
        "{self.expected!r}; connect it with the format its marker names, or upgrade Strata if "
        "that format is newer"
    )

    def __init__(self, *, path: str, found: str, expected: str) -> None:
        self.path = path
        self.found = found
        self.expected = expected
        super().__init__()


class RepositoryNotEmpty(StrataError):
    """``entries`` names (some of) what the directory holds."""

    code = "repository_not_empty"
    template = (
        "{self.path} is not empty (it holds {self.entries}); a repository is formatted only in "
        "an empty directory: choose another one or empty it first"
    )

    def __init__(self, *, path: str, entries: str) -> None:
        self.path = path
        self.entries = entries
        super().__init__()


class RepositoryAlreadyFormatted(RepositoryNotEmpty):
    """What the directory holds is a repository already: ``found`` is what its marker says."""

    code = "repository_already_formatted"
    template = (
        "{self.path} already holds a repository (its marker says {self.found!r}); connect it "
        "instead of creating it"
    )

    def __init__(self, *, path: str, found: str) -> None:
        self.found = found
        super().__init__(path=path, entries=f"a repository marked {found!r}")


class VolumeAlreadyExists(StrataError):
    code = "volume_already_exists"
    template = (
        "Volume file {self.path} already exists and is never replaced; remove it first if it "
        "is really unwanted"
    )

    def __init__(self, *, path: str) -> None:
        self.path = path
        super().__init__()


class VolumeFileNotFound(StrataError):
    code = "volume_file_not_found"
    template = "Volume file {self.path} does not exist"

    def __init__(self, *, path: str) -> None:
        self.path = path
        super().__init__()


class ForeignFile(StrataError):
    """Something inside a repository that is not the repository's own: a symbolic link, a file
    that also has a name outside it (a hard link), or not a regular file or directory."""

    code = "foreign_file"
    template = (
        "{self.path} is {self.what}: Strata never follows a link inside a repository and does "
        "not read, write, clean or copy through it; put the repository's own file or directory "
        "back in its place (or remove it by hand), then check the repository again"
    )

    def __init__(self, *, path: str, what: str) -> None:
        self.path = path
        self.what = what
        super().__init__()


# --- QEMU's image tools ---------------------------------------------------------------------


class QemuError(StrataError):
    """A QEMU tool failed; ``command``, ``returncode`` (``None`` when the tool did not exit by
    itself, or did not start) and the tail of ``stderr`` say how."""

    code = "qemu_error"
    template = "{self.command} failed with exit code {self.returncode}: {self.stderr}"

    def __init__(self, *, command: str, returncode: int | None, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        super().__init__()

    @property
    def locked(self) -> bool:
        """Whether QEMU said that another process holds the image's lock ("write", "consistent
        read"...): a writer still running somewhere, to wait for rather than fail on."""
        return _LOCKED.search(self.stderr) is not None


_LOCKED = re.compile(r'Failed to get (shared )?"[^"]+" lock')


class QemuTimeout(QemuError):
    code = "qemu_timeout"
    template = (
        "{self.command} did not finish within {self.timeout} seconds and was killed; the "
        "storage may be slow or hung: retry later or with a longer timeout"
    )

    def __init__(self, *, command: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(command=command, returncode=None, stderr="")


class QemuCancelled(QemuError):
    """A QEMU tool was killed because its caller cancelled the work (``cancel`` was set)."""

    code = "qemu_cancelled"
    template = "{self.command} was cancelled and killed"

    def __init__(self, *, command: str) -> None:
        super().__init__(command=command, returncode=None, stderr="cancelled")


class DaemonError(StrataError):
    """The host's ``qemu-storage-daemon`` refused a QMP ``command`` or could not be reached.

    ``error_class`` is QMP's class of the refusal (``GenericError``, ``DeviceNotFound``), None
    when no answer came (the daemon did not start, is gone, or did not answer in time); ``desc``
    is QEMU's own words, or what went wrong on the way to it.
    """

    code = "daemon_error"
    template = (
        "The storage daemon on {self.socket} failed {self.command}: {self.desc}; its own log "
        "is daemon.log beside the socket"
    )

    def __init__(self, *, command: str, error_class: str | None, desc: str, socket: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.socket = socket
        super().__init__()


class VolumeLocked(QemuError):
    """QEMU refused to open a volume for writing: another process holds its image lock.

    A fenced host's ``qemu-img`` that is still running is one such process; the work waits for
    the lock rather than failing at once.
    """

    code = "volume_locked"
    template = (
        "{self.path} is locked by another process (QEMU image locking) and stayed locked for "
        "{self.waited} s: {self.stderr}; find the process using it (a virtual machine, or a "
        "host that was fenced), then mend the image"
    )

    def __init__(
        self, *, path: str, waited: float, command: str, returncode: int | None, stderr: str
    ) -> None:
        self.path = path
        self.waited = waited
        super().__init__(command=command, returncode=returncode, stderr=stderr)


# --- repositories and images (the facade) -----------------------------------------------------


class RepositoryNotConnected(StrataError):
    code = "repository_not_connected"
    template = "No repository is connected as {self.repo_id!r} on this host; connect it first"

    def __init__(self, *, repo_id: str) -> None:
        self.repo_id = repo_id
        super().__init__()


class RepositoryAlreadyConnected(StrataError):
    code = "repository_already_connected"
    template = (
        "{self.repo_id!r} is already connected on this host (to {self.path}); disconnect it or "
        "pick another name"
    )

    def __init__(self, *, repo_id: str, path: str) -> None:
        self.repo_id = repo_id
        self.path = path
        super().__init__()


class RepositoryBusy(StrataError):
    code = "repository_busy"
    template = (
        "This host is running stages in {self.repo_id!r}; wait for them, or disconnect with "
        "force=True to leave them for another host"
    )

    def __init__(self, *, repo_id: str) -> None:
        self.repo_id = repo_id
        super().__init__()


class ImageNotFound(StrataError):
    """``image_id`` is ``None`` when the caller named no image (a lookup by volume path)."""

    code = "image_not_found"
    vdsm_code = 13  # imageErr
    template = "Image {self.image_id} not found {self.detail}"

    def __init__(self, detail: str, *, image_id: ImageId | None) -> None:
        self.image_id = image_id
        super().__init__(detail)

    @property
    def message(self) -> str:
        if self.image_id is None:
            return f"No image found {self.detail}"
        return super().message


class WrongImageKind(StrataError):
    code = "wrong_image_kind"
    template = "Image {self.image_id} is a {self.kind}; this needs a {self.expected}"

    def __init__(self, *, image_id: ImageId, kind: str, expected: str) -> None:
        self.image_id = image_id
        self.kind = kind
        self.expected = expected
        super().__init__()


class ImageInUse(StrataError):
    code = "image_in_use"
    template = "Image {self.image_id} is {self.detail}; tear it down first or wait"

    def __init__(self, detail: str, *, image_id: ImageId) -> None:
        self.image_id = image_id
        super().__init__(detail)


class ImageNotReady(StrataError):
    code = "image_not_ready"
    template = "Image {self.image_id} is {self.status}: {self.detail}"

    def __init__(self, detail: str, *, image_id: ImageId, status: str) -> None:
        self.image_id = image_id
        self.status = status
        super().__init__(detail)


class StaleFix(StrataError):
    code = "stale_fix"
    template = (
        "This fix no longer applies ({self.detail}); run check_storage_repository again and "
        "use a fix it returns"
    )

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


class ClaimLost(StaleFix):
    """A host tried to record the outcome of a stage another host has claimed since."""

    code = "claim_lost"
    template = (
        "The claim on {self.image_id} stage {self.stage} moved on ({self.detail}); this host's "
        "work is void"
    )

    def __init__(self, detail: str, *, image_id: ImageId, stage: int) -> None:
        self.image_id = image_id
        self.stage = stage
        super().__init__(detail)


class WaitTimeout(StrataError):
    code = "wait_timeout"
    template = "Image {self.image_id} still has work pending after {self.timeout} s ({self.detail})"

    def __init__(self, detail: str, *, image_id: ImageId, timeout: float) -> None:
        self.image_id = image_id
        self.timeout = timeout
        super().__init__(detail)


# --- executors ------------------------------------------------------------------------------


class StageCancelled(StrataError):
    """A running stage was stopped (``FixStopped``, its claim moved on, or the host stops)."""

    code = "stage_cancelled"
    template = (
        "Stage {self.stage} of operation {self.op_id} on image {self.image_id} was cancelled "
        "({self.detail}); its temporary file is left for the next attempt or a clean fix"
    )

    def __init__(self, detail: str, *, image_id: ImageId, op_id: str, stage: int) -> None:
        self.image_id = image_id
        self.op_id = op_id
        self.stage = stage
        super().__init__(detail)


class DeepCheckUnfinished(StrataError):
    """A deep check (docs/adr/0033) was stopped (``stop_fix`` on its carrier) or failed before
    it got through every volume: it recorded nothing."""

    code = "deep_check_unfinished"
    template = (
        "The deep check {self.image_id} was {self.outcome} before it read every volume "
        "({self.detail}); it recorded nothing: run it again to have the repository checked"
    )

    def __init__(self, detail: str, *, image_id: ImageId, outcome: str) -> None:
        self.image_id = image_id
        self.outcome = outcome
        super().__init__(detail)


class PivotUnknown(StrataError):
    """A host died with its daemon between asking an active commit to switch onto its base and
    recording that it did; top and base differ, and only the dead daemon knew which one the
    virtual machine wrote last (docs/adr/0028)."""

    code = "pivot_unknown"
    template = (
        "Image {self.image_id}: the host that committed {self.top} into {self.base} died while "
        "switching onto the base, and the two differ; both are kept: compare them, keep the "
        "right one, then mend or remove the image"
    )

    def __init__(self, *, image_id: ImageId, top: str, base: str) -> None:
        self.image_id = image_id
        self.top = top
        self.base = base
        super().__init__()


class VolumeMismatch(StrataError):
    """A stage's volume is already published but is not what the stage would have made."""

    code = "volume_mismatch"
    template = (
        "Volume {self.path} already exists but does not match the stage ({self.detail}); check "
        "which image uses it before removing it, then mend the image"
    )

    def __init__(self, detail: str, *, path: str) -> None:
        self.path = path
        super().__init__(detail)


class ExecutorFailed(StrataError):
    code = "executor_failed"
    template = (
        "The executor of host {self.host_id} stopped on an unexpected error: {self.detail}; "
        "stages it had claimed stay claimed until it restarts"
    )

    def __init__(self, detail: str, *, host_id: str) -> None:
        self.host_id = host_id
        super().__init__(detail)


class EngineClosed(StrataError):
    code = "engine_closed"
    template = "This StorageEngine was closed; make a new one to go on"

    def __init__(self) -> None:
        super().__init__()


# --- hosts and fencing ----------------------------------------------------------------------


class HostIdInUse(StrataError):
    """Another live process holds this host id's lock on the repository (architecture §5)."""

    code = "host_id_in_use"
    template = (
        "Host id {self.host_id!r} is in use on {self.path} by another live process "
        "({self.detail}); give each engine process its own host id, or stop the other one first"
    )

    def __init__(self, detail: str, *, host_id: str, path: str) -> None:
        self.host_id = host_id
        self.path = path
        super().__init__(detail)


# --- the auditors' tools (log_tools) --------------------------------------------------------


class ToolFailed(StrataError):
    """A command of ``strata-log`` could not finish for a reason that is not the log's: the
    operating system refused a read or a write, or Graphviz failed or ran out of time."""

    code = "tool_failed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


# --- live storage migration (seed 003's errors, with its numbers) ----------------------------


class NotAttached(StrataError):
    """The call needs the image attached on this host (VDSM's noVM)."""

    code = "not_attached"
    vdsm_code = 1
    template = "Image {self.image_id} is not attached on host {self.host_id}: {self.detail}"

    def __init__(self, detail: str, *, image_id: ImageId, host_id: str) -> None:
        self.image_id = image_id
        self.host_id = host_id
        super().__init__(detail)


class ReplicationNotReady(StrataError):
    """The copy has not converged yet: retry later (VDSM's unavail)."""

    code = "replication_not_ready"
    vdsm_code = 40
    template = "The replication of image {self.image_id} is not ready: {self.detail}; retry later"

    def __init__(self, detail: str, *, image_id: ImageId) -> None:
        self.image_id = image_id
        super().__init__(detail)


class ReplicationSwitchFailed(StrataError):
    """The switch to the replica failed; the image stays on the source (VDSM's changeDisk)."""

    code = "replication_switch_failed"
    vdsm_code = 41
    template = (
        "Image {self.image_id} could not switch to its replica ({self.detail}); it stays on "
        "the source"
    )

    def __init__(self, detail: str, *, image_id: ImageId) -> None:
        self.image_id = image_id
        super().__init__(detail)


class ReplicationError(StrataError):
    """Another replication runs, or there is none to finish (VDSM's replicaErr)."""

    code = "replication_error"
    vdsm_code = 55
    template = "Replication of image {self.image_id}: {self.detail}"

    def __init__(self, detail: str, *, image_id: ImageId) -> None:
        self.image_id = image_id
        super().__init__(detail)
