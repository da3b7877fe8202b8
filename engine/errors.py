"""Every error Strata raises on purpose, rooted at :class:`StrataError`.

Each class has a stable ``code`` (callers and the command line key on it, so a code is never
reused or renamed) and a message template filled from structured fields, so that a caller can
both show a sentence to a person and act on the fields. Third-party errors are translated at the
boundary with ``raise ... from e``.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class StrataError(Exception):
    """Base of every error the engine raises on purpose."""

    code: ClassVar[str] = "strata_error"
    template: ClassVar[str] = "{detail}"

    def __init__(self, detail: str = "", **fields: Any) -> None:
        self.detail = detail
        self.fields = fields
        for name, value in fields.items():
            setattr(self, name, value)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        try:
            return self.template.format(detail=self.detail, **self.fields)
        except (KeyError, IndexError):  # a template field was not given: still say something
            return f"{self.detail} {self.fields}".strip()

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **_plain(self.fields)}


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | None) else str(v)
        for k, v in fields.items()
    }


# --- input ----------------------------------------------------------------------------------


class InvalidParameter(StrataError):
    code = "invalid_parameter"
    template = "Invalid {name}: {detail}"


# --- the log --------------------------------------------------------------------------------


class LogError(StrataError):
    code = "log_error"


class NotAStrataLog(LogError):
    code = "not_a_strata_log"
    template = (
        "{path} is not a Strata log ({detail}); point the tool at a repository directory or its "
        "log/ directory"
    )


class UnsupportedLogVersion(LogError):
    code = "unsupported_log_version"
    template = (
        "{path} uses log format version {version}, this Strata reads versions up to "
        "{supported}; upgrade Strata on this host before touching this repository"
    )


class LogCorrupted(LogError):
    code = "log_corrupted"
    template = (
        "Log damaged in segment {segment} at byte offset {offset}: {detail}. Nothing after this "
        "point was read; restore the segment from a replica or backup, then run "
        "'strata-log verify'"
    )


class ConcurrencyConflict(LogError):
    """An append was refused because the aggregate changed since the caller read it."""

    code = "concurrency_conflict"
    template = (
        "Aggregate {originator_id} is at version {current}, the append expected to write "
        "version {attempted}; re-read it and retry"
    )


class LogClosed(LogError):
    code = "log_closed"
    template = "The log at {path} is closed"


class CommitUnknown(LogError):
    """A write of the log failed in a way that leaves unknown whether it reached the disk."""

    code = "commit_unknown"
    template = (
        "Whether the append to the log at {path} was committed is unknown ({detail}); the "
        "next append or a reconnect reads the log and settles it. Retrying the same call with "
        "the same arguments is safe"
    )


class LogMissing(LogError):
    """The log directory (or its last segment) was removed or replaced under a running host."""

    code = "log_missing"
    template = (
        "The log at {path} was removed or replaced while this host had it open ({detail}); "
        "nothing was appended. Restore the repository's log, then disconnect and connect the "
        "repository again"
    )


# --- the storage under the engine -----------------------------------------------------------


class StorageError(StrataError):
    """The operating system refused a file operation in a repository or the state directory.

    ``errno`` is the operating system's error number, ``path`` the file concerned.
    """

    code = "storage_error"
    template = "{doing} {path} failed: {detail}; check the storage and retry"


class StorageFull(StorageError):
    code = "storage_full"
    template = (
        "{doing} {path} failed: the filesystem is full. Free space there: calls and "
        "executors resume by themselves, and the check offers fixes for work that failed"
    )


class StorageReadOnly(StorageError):
    code = "storage_read_only"
    template = (
        "{doing} {path} failed: the filesystem is read-only. Make it writable again: calls "
        "and executors resume by themselves, and the check offers fixes for work that failed"
    )


class PermissionDenied(StorageError):
    code = "permission_denied"
    template = (
        "{doing} {path} failed: permission denied; give this host's user access to the "
        "repository (or the state directory) and retry"
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
    where = path if path is not None else (e.filename if e.filename is not None else "")
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
        "{doing} failed on an unexpected error, a bug in Strata: {detail}; the log holds "
        "whatever was committed before it. Report it with this message"
    )


# --- the eventsourcing boundary -------------------------------------------------------------


class NotSupported(StrataError):
    """An eventsourcing feature that Strata's persistence refuses rather than fakes."""

    code = "not_supported"
    template = "{feature} is not supported by Strata's persistence: {detail}"


# --- repositories ---------------------------------------------------------------------------


class UnknownRepositoryFormat(StrataError):
    code = "unknown_repository_format"
    template = "Unknown repository format {name!r}; this Strata knows: {known}"


class NotARepository(StrataError):
    code = "not_a_repository"
    template = (
        "{path} is not a Strata repository ({detail}); check the path, or format an empty "
        "directory with create_storage_repository"
    )


class RepositoryFormatMismatch(StrataError):
    code = "repository_format_mismatch"
    template = (
        "{path} holds a repository whose marker says {found!r}, not {expected!r}; connect it "
        "with the format its marker names, or upgrade Strata if that format is newer"
    )


class RepositoryNotEmpty(StrataError):
    code = "repository_not_empty"
    template = (
        "{path} is not empty (it holds {entries}); a repository is formatted only in an empty "
        "directory: choose another one or empty it first"
    )


class RepositoryAlreadyFormatted(RepositoryNotEmpty):
    code = "repository_already_formatted"
    template = (
        "{path} already holds a repository (its marker says {found!r}); connect it instead "
        "of creating it"
    )


class VolumeAlreadyExists(StrataError):
    code = "volume_already_exists"
    template = (
        "Volume file {path} already exists and is never replaced; remove it first if it is "
        "really unwanted"
    )


class VolumeFileNotFound(StrataError):
    code = "volume_file_not_found"
    template = "Volume file {path} does not exist"


class ForeignFile(StrataError):
    """Something inside a repository that is not the repository's own: a symbolic link, a file
    that also has a name outside it (a hard link), or not a regular file or directory."""

    code = "foreign_file"
    template = (
        "{path} is {what}: Strata never follows a link inside a repository and does not read, "
        "write, clean or copy through it; put the repository's own file or directory back in "
        "its place (or remove it by hand), then check the repository again"
    )


# --- QEMU's image tools ---------------------------------------------------------------------


class QemuError(StrataError):
    """A QEMU tool failed; ``command``, ``returncode`` and the tail of ``stderr`` say how."""

    code = "qemu_error"
    template = "{command} failed with exit code {returncode}: {stderr}"


class QemuTimeout(QemuError):
    code = "qemu_timeout"
    template = (
        "{command} did not finish within {timeout} seconds and was killed; the storage may be "
        "slow or hung: retry later or with a longer timeout"
    )


# --- repositories and images (the facade) -----------------------------------------------------


class RepositoryNotConnected(StrataError):
    code = "repository_not_connected"
    template = "No repository is connected as {repo_id!r} on this host; connect it first"


class RepositoryAlreadyConnected(StrataError):
    code = "repository_already_connected"
    template = (
        "{repo_id!r} is already connected on this host (to {path}); disconnect it or pick "
        "another name"
    )


class RepositoryBusy(StrataError):
    code = "repository_busy"
    template = (
        "This host is running stages in {repo_id!r}; wait for them, or disconnect with "
        "force=True to leave them for another host"
    )


class ImageNotFound(StrataError):
    code = "image_not_found"
    template = "Image {image_id} not found {detail}"


class WrongImageKind(StrataError):
    code = "wrong_image_kind"
    template = "Image {image_id} is a {kind}; this needs a {expected}"


class ImageInUse(StrataError):
    code = "image_in_use"
    template = "Image {image_id} is {detail}; tear it down first or wait"


class ImageNotReady(StrataError):
    code = "image_not_ready"
    template = "Image {image_id} is {status}: {detail}"


class StaleFix(StrataError):
    code = "stale_fix"
    template = (
        "This fix no longer applies ({detail}); run check_storage_repository again and use "
        "a fix it returns"
    )


class WaitTimeout(StrataError):
    code = "wait_timeout"
    template = "Image {image_id} still has work pending after {timeout} s ({detail})"


# --- executors ------------------------------------------------------------------------------


class StageCancelled(StrataError):
    """A running stage was stopped (``FixStopped``, its claim moved on, or the host stops)."""

    code = "stage_cancelled"
    template = (
        "Stage {stage} of operation {op_id} on image {image_id} was cancelled ({detail}); its "
        "temporary file is left for the next attempt or a clean fix"
    )


class VolumeMismatch(StrataError):
    """A stage's volume is already published but is not what the stage would have made."""

    code = "volume_mismatch"
    template = (
        "Volume {path} already exists but does not match the stage ({detail}); check which "
        "image uses it before removing it, then mend the image"
    )


class ExecutorFailed(StrataError):
    code = "executor_failed"
    template = (
        "The executor of host {host_id} stopped on an unexpected error: {detail}; stages it "
        "had claimed stay claimed until it restarts"
    )


class EngineClosed(StrataError):
    code = "engine_closed"
    template = "This StorageEngine was closed; make a new one to go on"


# --- hosts and fencing ----------------------------------------------------------------------


class HostIdInUse(StrataError):
    """Another live process holds this host id's lock on the repository (architecture §5)."""

    code = "host_id_in_use"
    template = (
        "Host id {host_id!r} is in use on {path} by another live process ({detail}); give "
        "each engine process its own host id, or stop the other one first"
    )


class QemuCancelled(QemuError):
    """A QEMU tool was killed because its caller cancelled the work (``cancel`` was set)."""

    code = "qemu_cancelled"
    template = "{command} was cancelled and killed"


class VolumeLocked(QemuError):
    """QEMU refused to open a volume for writing: another process holds its image lock.

    A fenced host's ``qemu-img`` that is still running is one such process; the work waits for
    the lock rather than failing at once.
    """

    code = "volume_locked"
    template = (
        "{path} is locked by another process (QEMU image locking) and stayed locked for "
        "{waited} s: {stderr}; find the process using it (a virtual machine, or a host that "
        "was fenced), then mend the image"
    )
