"""What every repository format driver offers (the registry of formats is in registry.py).

A driver class formats a place (:meth:`RepositoryFormat.create`) and opens it
(:meth:`RepositoryFormat.open`) as a :class:`RepositoryStorage`: where the log is, where each
volume's file goes, and the few file operations that must be atomic and durable for stages to be
idempotent. Image data itself is handled by :mod:`engine.formats.qemu.image_tools`, never by a
driver.

Imports: only :mod:`engine.errors`. Drivers import this module; it imports no driver.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.errors import InvalidParameter

# A volume id is 32 lowercase hex digits (``uuid.uuid4().hex``): it becomes a file name, so it
# can hold no separator, no dot and nothing a shell or QEMU would read specially.
VOLUME_ID: re.Pattern[str] = re.compile(r"[0-9a-f]{32}")
# A temporary file's tag names the stage that writes it (e.g. ``copy-7``): no dots, so that a
# file name splits back into id, format and tag without ambiguity.
TAG: re.Pattern[str] = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class VolumeFile:
    """A file in a repository that holds (or is becoming) a volume.

    ``size`` is the file's length and ``allocated`` the bytes it occupies on storage; the
    image's virtual size is what ``QemuImg.info`` says. A temporary file has the ``tag`` of the
    stage that writes it. ``size`` and ``allocated`` of a foreign file are those of the link or
    name itself (never followed).
    """

    volume_id: str
    fmt: str
    path: str
    size: int
    allocated: int
    is_temporary: bool
    tag: str | None = None
    # Why it is not the repository's own (a symbolic link, a hard link, not a regular file),
    # or None: a foreign file is reported, never written, cleaned or copied through.
    foreign: str | None = None
    # (inode, mtime, ctime) as listed: the same for a file whose bytes nobody wrote since,
    # so that a check need not read a header again that it found sound before. ctime cannot
    # be set back by anyone, so no write goes unnoticed. None where the driver cannot tell.
    identity: tuple[int, int, int] | None = None


def check_volume_id(volume_id: object) -> str:
    if not isinstance(volume_id, str) or not VOLUME_ID.fullmatch(volume_id):
        raise InvalidParameter(
            f"32 lowercase hex digits (uuid.uuid4().hex), not {volume_id!r}", name="volume_id"
        )
    return volume_id


def check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise InvalidParameter(
            f"1 to 64 letters, digits, '-' or '_', not {tag!r}", name="temporary file tag"
        )
    return tag


class RepositoryStorage(ABC):
    """An open repository: its paths and its durable file operations.

    Paths are absolute strings. Every method that takes a path refuses one that is not a volume
    or temporary file of this repository, so a bug elsewhere cannot unlink an arbitrary file,
    and refuses a foreign file (:class:`~engine.errors.ForeignFile`), so that a link placed in a
    repository cannot make Strata write, remove or read outside it.
    """

    root: str
    log_dir: str

    @abstractmethod
    def volume_path(self, volume_id: str, fmt: str) -> str:
        """Where the published volume ``volume_id`` in format ``fmt`` lives."""

    @abstractmethod
    def temp_path(self, volume_id: str, fmt: str, tag: str) -> str:
        """Where a stage writes ``volume_id`` before publishing it; recovery finds it by name."""

    @abstractmethod
    def list_volume_files(self) -> list[VolumeFile]:
        """Every volume and temporary file, in name order; other files are not listed.

        Nothing is followed: a volume's name that is a link, a file with names outside the
        repository or not a regular file is listed with ``foreign`` saying so. Raises
        :class:`~engine.errors.ForeignFile` if the place of the volumes is itself a link.
        """

    @abstractmethod
    def temporaries_of(self, volume_id: str) -> list[VolumeFile]:
        """The temporary files of one volume: what a stage re-run removes before it starts.

        Cheap beside :meth:`list_volume_files`, which stats every file: stages call this once
        each, so in a repository of many volumes it must not cost a stat per volume.
        """

    @abstractmethod
    def check_own_file(self, path: str) -> None:
        """Raise :class:`~engine.errors.ForeignFile` unless the volume or temporary file
        ``path`` is missing or the repository's own: reached through no link, and with no
        name outside the repository. Called right before qemu-img gets the path, since QEMU
        follows links."""

    @abstractmethod
    def publish(self, temp_path: str, final_path: str) -> None:
        """Durably and atomically give a finished temporary file its volume's name.

        Raises :class:`~engine.errors.VolumeAlreadyExists` rather than replace another file;
        publishing again after a crash between the two names is a no-op.
        """

    @abstractmethod
    def replace(self, temp_path: str, final_path: str) -> None:
        """Durably and atomically put a finished temporary file in place of the volume
        ``final_path`` (which must exist): how a migration's sync puts a copied volume over
        its empty clone in a replica (docs/adr/0029), and nothing else may.

        Raises :class:`~engine.errors.VolumeFileNotFound` if either file is missing, and
        InvalidParameter if ``temp_path`` is not a temporary file of ``final_path``'s volume
        and format; a temporary file that is the volume already (a publish killed between
        its two names) loses its temporary name.
        """

    @abstractmethod
    def retag(self, temp_path: str, new_temp_path: str) -> None:
        """Durably give the temporary file ``temp_path`` the temporary name
        ``new_temp_path`` of the same volume and format: how an attempt that resumes a copy
        takes over the file of the attempt it resumes (docs/adr/0032). The file is the same
        (a process that has it open keeps writing into it).

        Raises :class:`~engine.errors.VolumeFileNotFound` if ``temp_path`` is missing,
        :class:`~engine.errors.VolumeAlreadyExists` rather than replace a file at
        ``new_temp_path``, and InvalidParameter unless both are temporary files of one volume
        and format.
        """

    @abstractmethod
    def copy_in(
        self,
        source_path: str,
        temp_path: str,
        *,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Copy the file ``source_path`` (another repository's volume) byte for byte into the
        temporary file ``temp_path``, leaving holes where the source has them, durably.
        ``progress`` is told the bytes done so far; a set ``cancel`` stops the copy
        (:class:`~engine.errors.StageCancelled` is for the caller to raise).

        ``temp_path`` must be a temporary file of this repository that does not exist yet
        (:class:`~engine.errors.VolumeAlreadyExists` otherwise: never written through); a
        source that is a link is not followed (:class:`~engine.errors.ForeignFile`), a missing
        one is :class:`~engine.errors.VolumeFileNotFound`. The two repositories may be on
        different filesystems.
        """

    @abstractmethod
    def remove(self, path: str) -> None:
        """Durably remove a volume or temporary file; a missing file is already removed, and a
        foreign one is refused, not unlinked."""

    @abstractmethod
    def relative_backing(self, from_volume_path: str, to_volume_path: str) -> str:
        """The backing reference to write into ``from_volume_path`` so that it reads
        ``to_volume_path`` (which may be in another repository), relative so that the
        repository can be moved."""

    @abstractmethod
    def free_bytes(self) -> int:
        """Bytes that new volumes can still use."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """``format``, ``version``, ``path``, ``free_bytes`` and ``total_bytes``."""


class RepositoryFormat(ABC):
    """A repository format driver: a class with class methods, registered in :data:`FORMATS`."""

    name: ClassVar[str]  # e.g. "localfs"
    version: ClassVar[str]  # e.g. "1.0"; FORMATS is keyed by "<name>-<version>"

    @classmethod
    @abstractmethod
    def create(cls, connection_parameters: Mapping[str, object], host_id: str) -> None:
        """Format an empty place as a repository with an empty log.

        Refuses a place that is not empty or already formatted
        (:class:`~engine.errors.RepositoryNotEmpty`,
        :class:`~engine.errors.RepositoryAlreadyFormatted`).
        """

    @classmethod
    @abstractmethod
    def open(cls, connection_parameters: Mapping[str, object]) -> RepositoryStorage:
        """Open a repository of exactly this format and version.

        Raises :class:`~engine.errors.InvalidParameter` for bad parameters,
        :class:`~engine.errors.NotARepository` where no repository is, and
        :class:`~engine.errors.RepositoryFormatMismatch` for a repository of another format.
        """
