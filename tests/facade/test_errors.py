"""Every error class can be built from its typed fields, says what it says, and keeps its code.

A ``code`` is what callers and the command line key on (architecture §7): once released it is
never renamed or reused, so the table below is frozen; a new error adds a row.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import uuid

import pytest

import engine.errors
from engine.boundary import translate
from engine.errors import (
    ClaimLost,
    CommitUnknown,
    ConcurrencyConflict,
    DaemonError,
    DeepCheckUnfinished,
    EngineClosed,
    ExecutorFailed,
    ForeignFile,
    HostIdInUse,
    ImageInUse,
    ImageNotFound,
    ImageNotReady,
    InternalError,
    InvalidParameter,
    LogClosed,
    LogCorrupted,
    LogError,
    LogMissing,
    NotARepository,
    NotAStrataLog,
    NotAttached,
    NotSupported,
    PermissionDenied,
    PivotUnknown,
    QemuCancelled,
    QemuError,
    QemuTimeout,
    ReplicationError,
    ReplicationNotReady,
    ReplicationSwitchFailed,
    RepositoryAlreadyConnected,
    RepositoryAlreadyFormatted,
    RepositoryBusy,
    RepositoryFormatMismatch,
    RepositoryNotConnected,
    RepositoryNotEmpty,
    StageCancelled,
    StaleFix,
    StorageError,
    StorageFull,
    StorageReadOnly,
    StrataError,
    ToolFailed,
    UnknownRepositoryFormat,
    UnsupportedLogVersion,
    VolumeAlreadyExists,
    VolumeFileNotFound,
    VolumeLocked,
    VolumeMismatch,
    WaitTimeout,
    WrongImageKind,
    sqlite_error,
    storage_error,
)

IMAGE = uuid.UUID("12345678-1234-5678-1234-567812345678")

# (the error built from its typed fields, its code, the message a user reads)
EXAMPLES: list[tuple[StrataError, str, str]] = [
    (StrataError("something"), "strata_error", "something"),
    (
        InvalidParameter("a whole number, not 'x'", name="workers"),
        "invalid_parameter",
        "Invalid workers: a whole number, not 'x'",
    ),
    (LogError("the log failed"), "log_error", "the log failed"),
    (
        NotAStrataLog("no segment files", path="/srv/r1/log"),
        "not_a_strata_log",
        (
            "/srv/r1/log is not a Strata log (no segment files); point the tool at a repository "
            "directory or its log/ directory"
        ),
    ),
    (
        UnsupportedLogVersion(path="/srv/r1/log/00000001.seg", version=9, supported=1),
        "unsupported_log_version",
        (
            "/srv/r1/log/00000001.seg uses log format version 9, this Strata reads versions up to "
            "1; upgrade Strata on this host before touching this repository"
        ),
    ),
    (
        LogCorrupted("record checksum mismatch", segment=3, offset=4096),
        "log_corrupted",
        (
            "Log damaged in segment 3 at byte offset 4096: record checksum mismatch. Nothing "
            "after this point was read; restore the segment from a replica or backup, then run "
            "'strata-log verify'"
        ),
    ),
    (
        ConcurrencyConflict(originator_id=IMAGE, current=4, attempted=4),
        "concurrency_conflict",
        (
            f"Aggregate {IMAGE} is at version 4, the append expected to write version 4; re-read "
            "it and retry"
        ),
    ),
    (LogClosed(path="/srv/r1/log"), "log_closed", "The log at /srv/r1/log is closed"),
    (
        CommitUnknown("EIO", path="/srv/r1/log"),
        "commit_unknown",
        (
            "Whether the append to the log at /srv/r1/log was committed is unknown (EIO); the "
            "next append or a reconnect reads the log and settles it. Retrying the same call with "
            "the same arguments is safe"
        ),
    ),
    (
        LogMissing("the directory is gone", path="/srv/r1/log"),
        "log_missing",
        (
            "The log at /srv/r1/log was removed or replaced while this host had it open (the "
            "directory is gone); nothing was appended. Restore the repository's log, then "
            "disconnect and connect the repository again"
        ),
    ),
    (
        StorageError("Input/output error", doing="Reading", path="/srv/r1/x", errno=5),
        "storage_error",
        "Reading /srv/r1/x failed: Input/output error; check the storage and retry",
    ),
    (
        StorageFull("No space left on device", doing="Appending to", path="/srv/r1/log", errno=28),
        "storage_full",
        (
            "Appending to /srv/r1/log failed: the filesystem is full. Free space there: calls and "
            "executors resume by themselves, and the check offers fixes for work that failed"
        ),
    ),
    (
        StorageReadOnly(
            "Read-only file system", doing="Appending to", path="/srv/r1/log", errno=30
        ),
        "storage_read_only",
        (
            "Appending to /srv/r1/log failed: the filesystem is read-only. Make it writable "
            "again: calls and executors resume by themselves, and the check offers fixes for work "
            "that failed"
        ),
    ),
    (
        PermissionDenied("Permission denied", doing="Opening", path="/srv/r1", errno=13),
        "permission_denied",
        (
            "Opening /srv/r1 failed: permission denied; give this host's user access to the "
            "repository (or the state directory) and retry"
        ),
    ),
    (
        InternalError("KeyError: 'x'", doing="Create virtual disk"),
        "internal_error",
        (
            "Create virtual disk failed on an unexpected error, a bug in Strata: KeyError: 'x'; "
            "the log holds whatever was committed before it. Report it with this message"
        ),
    ),
    (
        NotSupported("the factory was closed", feature="Using a closed factory"),
        "not_supported",
        "Using a closed factory is not supported by Strata's persistence: the factory was closed",
    ),
    (
        UnknownRepositoryFormat(name="nfs-9", known="localfs-1.0"),
        "unknown_repository_format",
        "Unknown repository format 'nfs-9'; this Strata knows: localfs-1.0",
    ),
    (
        NotARepository("no .strata marker", path="/srv/r1"),
        "not_a_repository",
        (
            "/srv/r1 is not a Strata repository (no .strata marker); check the path, or format an "
            "empty directory with create_storage_repository"
        ),
    ),
    (
        RepositoryFormatMismatch(path="/srv/r1", found="localfs-2.0", expected="localfs-1.0"),
        "repository_format_mismatch",
        (
            "/srv/r1 holds a repository whose marker says 'localfs-2.0', not 'localfs-1.0'; "
            "connect it with the format its marker names, or upgrade Strata if that format is "
            "newer"
        ),
    ),
    (
        RepositoryNotEmpty(path="/srv/r1", entries="precious.txt"),
        "repository_not_empty",
        (
            "/srv/r1 is not empty (it holds precious.txt); a repository is formatted only in an "
            "empty directory: choose another one or empty it first"
        ),
    ),
    (
        RepositoryAlreadyFormatted(path="/srv/r1", found="localfs-1.0"),
        "repository_already_formatted",
        (
            "/srv/r1 already holds a repository (its marker says 'localfs-1.0'); connect it "
            "instead of creating it"
        ),
    ),
    (
        VolumeAlreadyExists(path="/srv/r1/volumes/v.qcow2"),
        "volume_already_exists",
        (
            "Volume file /srv/r1/volumes/v.qcow2 already exists and is never replaced; remove it "
            "first if it is really unwanted"
        ),
    ),
    (
        VolumeFileNotFound(path="/srv/r1/volumes/v.qcow2"),
        "volume_file_not_found",
        "Volume file /srv/r1/volumes/v.qcow2 does not exist",
    ),
    (
        ForeignFile(path="/srv/r1/volumes", what="a symbolic link to '/other'"),
        "foreign_file",
        (
            "/srv/r1/volumes is a symbolic link to '/other': Strata never follows a link inside a "
            "repository and does not read, write, clean or copy through it; put the repository's "
            "own file or directory back in its place (or remove it by hand), then check the "
            "repository again"
        ),
    ),
    (
        QemuError(command="qemu-img info x", returncode=1, stderr="no such file"),
        "qemu_error",
        "qemu-img info x failed with exit code 1: no such file",
    ),
    (
        QemuTimeout(command="qemu-img convert a b", timeout=30),
        "qemu_timeout",
        (
            "qemu-img convert a b did not finish within 30 seconds and was killed; the storage "
            "may be slow or hung: retry later or with a longer timeout"
        ),
    ),
    (
        QemuCancelled(command="qemu-img convert a b"),
        "qemu_cancelled",
        "qemu-img convert a b was cancelled and killed",
    ),
    (
        DaemonError(
            command="blockdev-add",
            error_class="GenericError",
            desc="Could not open '/v/x': No such file or directory",
            socket="/var/lib/strata/daemon/qmp.sock",
        ),
        "daemon_error",
        (
            "The storage daemon on /var/lib/strata/daemon/qmp.sock failed blockdev-add: Could not "
            "open '/v/x': No such file or directory; its own log is daemon.log beside the socket"
        ),
    ),
    (
        VolumeLocked(
            path="/srv/r1/volumes/v.qcow2",
            waited=60.0,
            command="qemu-img rebase",
            returncode=1,
            stderr='Failed to get "write" lock',
        ),
        "volume_locked",
        (
            "/srv/r1/volumes/v.qcow2 is locked by another process (QEMU image locking) and stayed "
            'locked for 60.0 s: Failed to get "write" lock; find the process using it (a virtual '
            "machine, or a host that was fenced), then mend the image"
        ),
    ),
    (
        RepositoryNotConnected(repo_id="r9"),
        "repository_not_connected",
        "No repository is connected as 'r9' on this host; connect it first",
    ),
    (
        RepositoryAlreadyConnected(repo_id="r1", path="/srv/r1"),
        "repository_already_connected",
        "'r1' is already connected on this host (to /srv/r1); disconnect it or pick another name",
    ),
    (
        RepositoryBusy(repo_id="r1"),
        "repository_busy",
        (
            "This host is running stages in 'r1'; wait for them, or disconnect with force=True to "
            "leave them for another host"
        ),
    ),
    (
        ImageNotFound("in repository 'r1'", image_id=IMAGE),
        "image_not_found",
        f"Image {IMAGE} not found in repository 'r1'",
    ),
    (
        WrongImageKind(image_id=IMAGE, kind="snapshot", expected="virtual_disk"),
        "wrong_image_kind",
        f"Image {IMAGE} is a snapshot; this needs a virtual_disk",
    ),
    (
        ImageInUse("prepared on ['host-a']", image_id=IMAGE),
        "image_in_use",
        f"Image {IMAGE} is prepared on ['host-a']; tear it down first or wait",
    ),
    (
        ImageNotReady("it has no volume yet", image_id=IMAGE, status="broken"),
        "image_not_ready",
        f"Image {IMAGE} is broken: it has no volume yet",
    ),
    (
        StaleFix("image x changed since the check"),
        "stale_fix",
        (
            "This fix no longer applies (image x changed since the check); run "
            "check_storage_repository again and use a fix it returns"
        ),
    ),
    (
        ClaimLost("claimed by host-b at epoch 3", image_id=IMAGE, stage=2),
        "claim_lost",
        (
            f"The claim on {IMAGE} stage 2 moved on (claimed by host-b at epoch 3); this host's "
            "work is void"
        ),
    ),
    (
        WaitTimeout("stage 1/2, 40%", image_id=IMAGE, timeout=5.0),
        "wait_timeout",
        f"Image {IMAGE} still has work pending after 5.0 s (stage 1/2, 40%)",
    ),
    (
        StageCancelled("stopped", image_id=IMAGE, op_id="op-1", stage=0),
        "stage_cancelled",
        (
            f"Stage 0 of operation op-1 on image {IMAGE} was cancelled (stopped); its temporary "
            "file is left for the next attempt or a clean fix"
        ),
    ),
    (
        DeepCheckUnfinished("stopped by host-a: enough", image_id=IMAGE, outcome="stopped"),
        "deep_check_unfinished",
        (
            f"The deep check {IMAGE} was stopped before it read every volume (stopped by "
            "host-a: enough); it recorded nothing: run it again to have the repository checked"
        ),
    ),
    (
        NotAttached("a replication mirrors what this host serves", image_id=IMAGE, host_id="h1"),
        "not_attached",
        f"Image {IMAGE} is not attached on host h1: a replication mirrors what this host serves",
    ),
    (
        ReplicationNotReady("the mirror has not converged", image_id=IMAGE),
        "replication_not_ready",
        f"The replication of image {IMAGE} is not ready: the mirror has not converged; retry later",
    ),
    (
        ReplicationSwitchFailed("job-complete failed", image_id=IMAGE),
        "replication_switch_failed",
        f"Image {IMAGE} could not switch to its replica (job-complete failed); it stays on the "
        "source",
    ),
    (
        ReplicationError("another replication runs", image_id=IMAGE),
        "replication_error",
        f"Replication of image {IMAGE}: another replication runs",
    ),
    (
        PivotUnknown(image_id=IMAGE, top="/r/volumes/t.qcow2", base="/r/volumes/b.qcow2"),
        "pivot_unknown",
        (
            f"Image {IMAGE}: the host that committed /r/volumes/t.qcow2 into /r/volumes/b.qcow2 "
            "died while switching onto the base, and the two differ; both are kept: compare "
            "them, keep the right one, then mend or remove the image"
        ),
    ),
    (
        VolumeMismatch("virtual size 1, not 2", path="/srv/r1/volumes/v.qcow2"),
        "volume_mismatch",
        (
            "Volume /srv/r1/volumes/v.qcow2 already exists but does not match the stage (virtual "
            "size 1, not 2); check which image uses it before removing it, then mend the image"
        ),
    ),
    (
        ExecutorFailed("boom", host_id="host-a"),
        "executor_failed",
        (
            "The executor of host host-a stopped on an unexpected error: boom; stages it had "
            "claimed stay claimed until it restarts"
        ),
    ),
    (EngineClosed(), "engine_closed", "This StorageEngine was closed; make a new one to go on"),
    (
        HostIdInUse("pid 42", host_id="host-a", path="/srv/r1/hosts/host-a"),
        "host_id_in_use",
        (
            "Host id 'host-a' is in use on /srv/r1/hosts/host-a by another live process (pid 42); "
            "give each engine process its own host id, or stop the other one first"
        ),
    ),
    (
        ToolFailed("Graphviz's dot failed: killed"),
        "tool_failed",
        "Graphviz's dot failed: killed",
    ),
]


def all_error_classes() -> set[type[StrataError]]:
    return {
        value
        for value in vars(engine.errors).values()
        if isinstance(value, type) and issubclass(value, StrataError)
    }


IDS = [type(error).__name__ for error, _, _ in EXAMPLES]


def test_every_error_class_has_one_example() -> None:
    assert sorted(IDS) == sorted(cls.__name__ for cls in all_error_classes())


def test_no_two_errors_share_a_code() -> None:
    codes = [cls.code for cls in all_error_classes()]
    assert len(set(codes)) == len(codes)


@pytest.mark.parametrize(("error", "code", "message"), EXAMPLES, ids=IDS)
def test_an_error_keeps_its_code_and_says_its_message(
    error: StrataError, code: str, message: str
) -> None:
    assert error.code == type(error).code == code
    assert str(error) == error.message == message
    assert error.to_dict()["code"] == code
    assert error.to_dict()["message"] == message


@pytest.mark.parametrize(("error", "code", "message"), EXAMPLES, ids=IDS)
def test_to_dict_holds_the_typed_fields_as_json_values(
    error: StrataError, code: str, message: str
) -> None:
    as_json = json.loads(json.dumps(error.to_dict()))
    fields = {name: value for name, value in vars(error).items() if name != "detail"}
    vdsm = {} if error.vdsm_code is None else {"vdsm_code": error.vdsm_code}
    assert as_json == {
        "code": code,
        "message": message,
        **{name: str(v) if isinstance(v, uuid.UUID) else v for name, v in fields.items()},
        **vdsm,
    }


def test_seed_003s_errors_carry_vdsms_numbers() -> None:
    numbers = {cls.__name__: cls.vdsm_code for cls in all_error_classes() if cls.vdsm_code}
    assert numbers == {
        "NotAttached": 1,
        "ImageNotFound": 13,
        "ReplicationNotReady": 40,
        "ReplicationSwitchFailed": 41,
        "ReplicationError": 55,
    }


def test_a_field_is_an_attribute_of_its_type() -> None:
    error = LogCorrupted("record checksum mismatch", segment=3, offset=4096)
    assert (error.segment, error.offset, error.detail) == (3, 4096, "record checksum mismatch")
    assert error.to_dict() == {
        "code": "log_corrupted",
        "message": str(error),
        "segment": 3,
        "offset": 4096,
    }


def test_a_qemu_error_of_any_kind_says_what_the_tool_printed() -> None:
    timeout = QemuTimeout(command="qemu-img convert a b", timeout=30)
    cancelled = QemuCancelled(command="qemu-img convert a b")
    locked = VolumeLocked(
        path="/v", waited=1.5, command="qemu-img rebase", returncode=1, stderr="lock"
    )
    assert [(e.command, e.returncode, e.stderr) for e in (timeout, cancelled, locked)] == [
        ("qemu-img convert a b", None, ""),
        ("qemu-img convert a b", None, "cancelled"),
        ("qemu-img rebase", 1, "lock"),
    ]


def test_a_conflict_reported_without_its_aggregate_says_so_without_placeholders() -> None:
    error = ConcurrencyConflict("the aggregate's version moved")
    assert (error.originator_id, error.current, error.attempted) == (None, None, None)
    assert str(error) == (
        "An aggregate changed since it was read (the aggregate's version moved); re-read it and "
        "retry"
    )


def test_an_image_looked_up_by_its_volume_is_not_found_without_an_id() -> None:
    error = ImageNotFound("whose volume is /srv/r1/volumes/v.qcow2", image_id=None)
    assert error.image_id is None
    assert str(error) == "No image found whose volume is /srv/r1/volumes/v.qcow2"


def test_a_lost_claim_is_a_stale_fix() -> None:
    error = ClaimLost("claimed by host-b at epoch 3", image_id=IMAGE, stage=2)
    assert isinstance(error, StaleFix)
    assert (error.image_id, error.stage) == (IMAGE, 2)


@pytest.mark.parametrize(
    ("number", "cls"),
    [
        (errno.ENOSPC, StorageFull),
        (errno.EDQUOT, StorageFull),
        (errno.EROFS, StorageReadOnly),
        (errno.EACCES, PermissionDenied),
        (errno.EPERM, PermissionDenied),
        (errno.EIO, StorageError),
    ],
    ids=errno.errorcode.get,
)
def test_an_operating_system_error_becomes_its_typed_storage_error(
    number: int, cls: type[StorageError]
) -> None:
    error = storage_error(OSError(number, "refused", "/srv/r1/x"), "Reading")
    assert type(error) is cls
    assert (error.doing, error.path, error.errno, error.detail) == (
        "Reading",
        "/srv/r1/x",
        number,
        "refused",
    )


def test_a_sqlite_error_becomes_a_storage_error_without_an_errno() -> None:
    error = sqlite_error(Exception("database or disk is full"), "Saving", "this host's read model")
    assert type(error) is StorageFull
    assert (error.path, error.errno) == ("this host's read model", 0)


def test_the_boundary_gives_a_typed_error_for_whatever_it_meets() -> None:
    own = StaleFix("image x changed since the check")
    assert translate(own, "Fix storage repository") is own
    full = translate(OSError(errno.ENOSPC, "No space left on device"), "Create virtual disk")
    assert isinstance(full, StorageFull)
    assert (full.doing, full.errno) == ("Create virtual disk", errno.ENOSPC)
    read_only = translate(
        sqlite3.OperationalError("attempt to write a readonly database"), "Connect"
    )
    assert isinstance(read_only, StorageReadOnly)
    assert (read_only.path, read_only.errno) == ("this host's read model", 0)
    bug = translate(KeyError("x"), "Get image status")
    assert isinstance(bug, InternalError)
    assert (bug.doing, bug.detail) == ("Get image status", "KeyError: 'x'")
