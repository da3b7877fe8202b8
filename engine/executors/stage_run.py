"""One attempt at one stage (:class:`StageRun`), and the volumes it names.

What an executor hands a stage kind of engine/executors/stages.py: the stage as planned, the
repository and qemu-img to work with, the claim's epoch, and the callbacks that tie it to the log
(progress, fencing checks, cancellation). The functions below turn a stage's references into
the files they name, with the typed errors a stage planned wrongly gets.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats`` (the
storage daemon for live stages); the standard library.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from engine.aggregates.image import DigestRecord, Image
from engine.aggregates.operations import Checkpoint, split_ref
from engine.aggregates.stage_kinds import Stage
from engine.errors import (
    ImageNotFound,
    ImageNotReady,
    InvalidParameter,
    StageCancelled,
    VolumeMismatch,
)
from engine.executors.crashpoints import DISARMED, CrashPoints
from engine.formats.qemu.digests import VolumeDigest
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.process import Progress
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.formats.repository.driver import RepositoryStorage

# Where an image lives, among the repositories connected on this host; None if in none of them.
FindImage = Callable[[uuid.UUID], tuple[Image, RepositoryStorage] | None]
# Whether a volume of another repository is made: no unfinished stage there will produce it.
ForeignReady = Callable[[RepositoryStorage, str], bool]


class Elsewhere(Protocol):
    """Another repository connected on this host, as a migration's stage reaches it: the
    destination, where the image's replica is (docs/adr/0029)."""

    @property
    def storage(self) -> RepositoryStorage: ...

    def image(self, image_id: uuid.UUID, /) -> Image | None:
        """The image as that repository's log holds it now (its view caught up first)."""

    def update(
        self, image_id: uuid.UUID, command: Callable[[Image, str, datetime], object], /
    ) -> None:
        """Let ``command`` decide on the image, given this host's id and the time, and save
        what it recorded in that repository's log."""


# The connected repository whose root is the path given; None if this host has none there.
RepositoryAt = Callable[[str], Elsewhere | None]


class SaveCheckpoint(Protocol):
    """Record a copy's checkpoint under the claim (engine.executors.progress.Claim.checkpoint);
    raises StageCancelled once the claim moved on."""

    def __call__(self, *, offset: int, percent: int, chunks: bytes, written: int) -> None: ...


_ATTEMPT_TAG = re.compile(r"(?P<op>.+)-(?P<stage>[0-9]+)-e(?P<epoch>[0-9]+)")
DEFAULT_LOCK_WAIT = 600.0  # seconds in-place work waits for a volume another process holds


class Damage(NamedTuple):
    """What a deep check's stage found wrong with a volume, to record on its owner with the
    stage's completion (``Image.DamageFound``, docs/adr/0033)."""

    owner: uuid.UUID
    volume: str
    ranges: list[list[int]]  # [start, end) of each chunk whose content differs
    detail: str


def _no_check() -> None:
    return None


def _no_image(image_id: uuid.UUID) -> Image | None:
    return None


def nowhere(root: str) -> Elsewhere | None:
    """No other repository: what a stage reaches when none was given."""
    return None


def _not_superseded() -> bool:
    return False


def _no_checkpoint() -> Checkpoint | None:
    return None


def _no_digest(ref: str) -> DigestRecord | None:
    return None


@dataclass(frozen=True)
class Live:
    """What a stage needs to run live: this host's daemon, the image attached here whose chain
    holds the volume the stage changes, and the way to record a step before taking it."""

    daemon: StorageDaemon
    image: Image
    reach: Callable[[str], None]


@dataclass(frozen=True)
class StageRun:
    """One attempt at one stage, under the claim ``epoch``."""

    image_id: uuid.UUID
    op_id: str
    index: int
    epoch: int
    stage: Stage
    storage: RepositoryStorage
    qemu: QemuImg
    find_image: FindImage
    progress: Progress | None = None
    crashpoints: CrashPoints = DISARMED
    cancel: threading.Event | None = None  # set: stop now (qemu-img is killed)
    confirm: Callable[[], None] = _no_check  # raises StageCancelled if the claim moved on
    superseded: Callable[[], bool] = _not_superseded  # another attempt replaced this one
    moved_on: Callable[[], bool] = _not_superseded  # the log ended this claim (stop, abort...)
    lock_wait: float = DEFAULT_LOCK_WAIT  # how long in-place work waits for a locked volume
    phase: str = ""  # the step a live attempt recorded before it (docs/adr/0028)
    live: Live | None = None  # set when the stage runs through this host's storage daemon
    repository_at: RepositoryAt = nowhere  # other connected repositories (a migration's)
    # A copy's checkpoints (docs/adr/0032): how to record one, and the last one the log holds
    # for this stage (an earlier attempt's). Without ``checkpoint``, a copy reports progress.
    checkpoint: SaveCheckpoint | None = None
    last_checkpoint: Callable[[], Checkpoint | None] = _no_checkpoint
    # Hands the digest of the volume the stage made to its completion (VolumeDigested).
    keep_digest: Callable[[str, VolumeDigest], None] | None = None
    # The digest this repository's log holds for a volume, if any (docs/adr/0031).
    recorded_digest: Callable[[str], DigestRecord | None] = _no_digest
    # An image of this repository as its view holds it, removed or not (a deep check reads
    # the digests its owners recorded: docs/adr/0033).
    local_image: Callable[[uuid.UUID], Image | None] = _no_image
    # What the stage found damaged (a deep check's): recorded with its completion.
    found: list[Damage] = dataclass_field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"{self.op_id}-{self.index}-e{self.epoch}"

    def is_later_attempt(self, tag: str | None) -> bool:
        """Whether a temporary file's tag is a later attempt at this same stage."""
        match = _ATTEMPT_TAG.fullmatch(tag or "")
        return (
            match is not None
            and match["op"] == self.op_id
            and int(match["stage"]) == self.index
            and int(match["epoch"]) > self.epoch
        )

    def cancelled(self, why: str) -> StageCancelled:
        return StageCancelled(why, image_id=self.image_id, op_id=self.op_id, stage=self.index)


@dataclass(frozen=True)
class Volume:
    ref: str
    volume_id: str
    fmt: str
    path: str


def local(run: StageRun, ref: object) -> Volume:
    if not isinstance(ref, str):
        raise InvalidParameter(f"not a volume reference: {ref!r}", name="stage")
    try:
        volume_id, fmt = split_ref(ref)
    except ValueError as e:
        raise InvalidParameter(str(e), name="stage") from None
    return Volume(ref, volume_id, fmt, run.storage.volume_path(volume_id, fmt))


def source_top(run: StageRun) -> Volume:
    """The top volume of the source image's current chain: reading it reads the whole chain,
    so :class:`~engine.errors.ForeignFile` if any volume of the chain is foreign."""
    image_id = source_id(run.stage)
    found = find_source(run.stage, run.find_image, run.repository_at)
    if found is None:
        root = run.stage.get("source_root")
        where = "in any repository connected on this host"
        if root is not None:
            where = f"in the repository at {root} (connected on this host?)"
        raise ImageNotFound(where, image_id=image_id)
    image, storage = found
    if not image.chain:
        raise ImageNotReady("it has no volume yet", image_id=image_id, status="broken")
    for ref in image.chain:
        storage.check_own_file(storage.volume_path(*split_ref(ref)))
    volume_id, fmt = split_ref(image.chain[-1])
    return Volume(image.chain[-1], volume_id, fmt, storage.volume_path(volume_id, fmt))


def find_source(
    stage: Mapping[str, object], find_image: FindImage, repository_at: RepositoryAt
) -> tuple[Image, RepositoryStorage] | None:
    """The image the stage reads (``source_image``) and its repository's storage: in the
    repository at ``source_root`` when the stage names one (the same id may be in several,
    with other bytes: a mend reads the replica its check chose, docs/adr/0034), else where
    ``find_image`` finds it."""
    image_id = source_id(stage)
    root = source_root(stage)
    if root is None:
        return find_image(image_id)
    other = repository_at(root)
    image = None if other is None else other.image(image_id)
    if other is None or image is None:
        return None
    return image, other.storage


def refuse_foreign(run: StageRun, *volumes: Volume) -> None:
    """:class:`~engine.errors.ForeignFile` if one of ``volumes``, or of the chain of the
    stage's image in this repository, is foreign. QEMU follows links and backing files, so
    what it will open is checked right before it runs (docs/adr/0016)."""
    for volume in volumes:
        run.storage.check_own_file(volume.path)
    found = run.find_image(run.image_id)
    if found is not None and found[1].root == run.storage.root:
        for ref in found[0].chain:
            run.storage.check_own_file(run.storage.volume_path(*split_ref(ref)))


def expect_backing(run: StageRun, final: str, info: dict[str, Any], backing: Volume | None) -> None:
    found = info.get("backing-filename")
    wanted = None if backing is None else run.storage.relative_backing(final, backing.path)
    if found != wanted:
        raise VolumeMismatch(f"backing file {found!r}, not {wanted!r}", path=final)


def source_id(stage: Mapping[str, object]) -> uuid.UUID:
    value = field(stage, "source_image")
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidParameter(f"not an image id: {value!r}", name="stage") from None


def source_root(stage: Mapping[str, object]) -> str | None:
    """The root of the repository a stage reads its source from, if it names one."""
    root = stage.get("source_root")
    if root is not None and not isinstance(root, str):
        raise InvalidParameter(f"not a repository root: {root!r}", name="stage")
    return root


def field(stage: Mapping[str, object], name: str) -> object:
    """``stage[name]``; a stage without it (planned wrongly) is an invalid parameter. Its value
    is checked where it is used: a log may hold anything."""
    try:
        return stage[name]
    except KeyError:
        raise InvalidParameter(
            f"a {stage.get('do')!r} stage needs {name!r}: {stage!r}", name="stage"
        ) from None
