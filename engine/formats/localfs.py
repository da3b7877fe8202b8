"""The ``localfs-1.0`` repository format: a directory on a POSIX filesystem (local, or NFSv4).

Layout (docs/adr/0003-repository-format-localfs.md)::

    <root>/STRATA-REPOSITORY                    {"format": "localfs", "version": "1.0"}
    <root>/log/                                 the operation log (engine.log)
    <root>/volumes/<volume_id>.<fmt>            published volumes
    <root>/volumes/.tmp-<volume_id>.<fmt>.<tag> a stage's file in progress
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

from engine.errors import (
    InvalidParameter,
    NotARepository,
    RepositoryAlreadyFormatted,
    RepositoryFormatMismatch,
    RepositoryNotEmpty,
    VolumeAlreadyExists,
    VolumeFileNotFound,
)
from engine.formats.driver import (
    TAG,
    VOLUME_ID,
    RepositoryFormat,
    RepositoryStorage,
    VolumeFile,
    check_tag,
    check_volume_id,
)
from engine.formats.qemu import allocated_bytes
from engine.formats.qemu_args import IMAGE_FORMATS, check_image_format
from engine.log import OperationLog

MARKER = "STRATA-REPOSITORY"
LOG_DIR = "log"
VOLUMES_DIR = "volumes"
TEMP_PREFIX = ".tmp-"
# Left by mkfs at the root of a filesystem: formatting a fresh mount point must work.
_IGNORED_WHEN_EMPTY = frozenset({"lost+found"})

_FORMATS = "|".join(IMAGE_FORMATS)
_VOLUME_NAME = re.compile(rf"({VOLUME_ID.pattern})\.({_FORMATS})")
_TEMP_NAME = re.compile(
    rf"{re.escape(TEMP_PREFIX)}({VOLUME_ID.pattern})\.({_FORMATS})\.({TAG.pattern})"
)


class LocalFS(RepositoryFormat):
    name = "localfs"
    version = "1.0"

    @classmethod
    def create(cls, connection_parameters: Mapping[str, object], host_id: str) -> None:
        root = _root(connection_parameters)
        if not isinstance(host_id, str) or not host_id:
            raise InvalidParameter(f"a non-empty string, not {host_id!r}", name="host_id")
        entries = sorted(set(os.listdir(root)) - _IGNORED_WHEN_EMPTY)
        if MARKER in entries:
            raise RepositoryAlreadyFormatted(path=root, found=_read_marker(root))
        if entries:
            raise RepositoryNotEmpty(path=root, entries=", ".join(entries[:5]))
        volumes = os.path.join(root, VOLUMES_DIR)
        try:
            # mkdir is atomic and exclusive: of two hosts formatting the same place, one wins.
            os.mkdir(volumes, 0o755)
        except FileExistsError:
            raise RepositoryNotEmpty(path=root, entries=VOLUMES_DIR) from None
        try:
            OperationLog.create(os.path.join(root, LOG_DIR), host_id).close()
            _fsync_directory(root)
            # The marker goes last: a place is a repository exactly when its marker exists.
            _write_marker(root, {"format": cls.name, "version": cls.version})
        except BaseException:
            shutil.rmtree(os.path.join(root, LOG_DIR), ignore_errors=True)
            os.rmdir(volumes)
            raise

    @classmethod
    def open(cls, connection_parameters: Mapping[str, object]) -> LocalStorage:
        root = _root(connection_parameters)
        if not os.path.exists(os.path.join(root, MARKER)):
            raise NotARepository(f"no {MARKER} marker", path=root)
        found, expected = _read_marker(root), f"{cls.name}-{cls.version}"
        if found != expected:
            raise RepositoryFormatMismatch(path=root, found=found, expected=expected)
        for sub in (LOG_DIR, VOLUMES_DIR):
            if not os.path.isdir(os.path.join(root, sub)):
                raise NotARepository(f"its marker is there but {sub}/ is missing", path=root)
        return LocalStorage(root, cls.name, cls.version)


class LocalStorage(RepositoryStorage):
    """An open ``localfs`` repository rooted at an absolute, normalized ``root``."""

    def __init__(self, root: str, name: str, version: str) -> None:
        self.root = root
        self.log_dir = os.path.join(root, LOG_DIR)
        self.volumes_dir = os.path.join(root, VOLUMES_DIR)
        self.format_name = name
        self.format_version = version

    def volume_path(self, volume_id: str, fmt: str) -> str:
        name = f"{check_volume_id(volume_id)}.{check_image_format(fmt)}"
        return os.path.join(self.volumes_dir, name)

    def temp_path(self, volume_id: str, fmt: str, tag: str) -> str:
        name = f"{check_volume_id(volume_id)}.{check_image_format(fmt)}.{check_tag(tag)}"
        return os.path.join(self.volumes_dir, TEMP_PREFIX + name)

    def list_volume_files(self) -> list[VolumeFile]:
        files = []
        for name in sorted(os.listdir(self.volumes_dir)):
            parsed = _parse(name)
            path = os.path.join(self.volumes_dir, name)
            if parsed is None or not os.path.isfile(path):
                continue
            volume_id, fmt, tag = parsed
            try:
                size, allocated = os.stat(path).st_size, allocated_bytes(path)
            except (FileNotFoundError, VolumeFileNotFound):
                continue  # removed while we looked: it is not there any more
            files.append(VolumeFile(volume_id, fmt, path, size, allocated, tag is not None, tag))
        return files

    def temporaries_of(self, volume_id: str) -> list[VolumeFile]:
        check_volume_id(volume_id)
        prefix = f"{TEMP_PREFIX}{volume_id}."
        found = []
        for name in os.listdir(self.volumes_dir):  # names only: a stat for just the matches
            if not name.startswith(prefix) or (parsed := _parse(name)) is None:
                continue
            path = os.path.join(self.volumes_dir, name)
            try:
                size, allocated = os.stat(path).st_size, allocated_bytes(path)
            except (FileNotFoundError, VolumeFileNotFound):
                continue
            found.append(VolumeFile(parsed[0], parsed[1], path, size, allocated, True, parsed[2]))
        return sorted(found, key=lambda f: f.path)

    def publish(self, temp_path: str, final_path: str) -> None:
        temp_id, temp_fmt, tag = self._own(temp_path, "temp_path")
        final_id, final_fmt, final_tag = self._own(final_path, "final_path")
        if tag is None or final_tag is not None or (temp_id, temp_fmt) != (final_id, final_fmt):
            raise InvalidParameter(
                f"{temp_path} is not the temporary file of {final_path}", name="temp_path"
            )
        try:
            _fsync_file(temp_path)  # the data is durable before the name says it is complete
            # link() fails if the name exists, where rename() would silently replace a volume.
            os.link(temp_path, final_path)
        except FileNotFoundError:
            raise VolumeFileNotFound(path=temp_path) from None
        except FileExistsError:
            if not os.path.samefile(temp_path, final_path):
                raise VolumeAlreadyExists(path=final_path) from None
        _fsync_directory(self.volumes_dir)
        os.unlink(temp_path)
        _fsync_directory(self.volumes_dir)

    def remove(self, path: str) -> None:
        self._own(path, "path")
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_directory(self.volumes_dir)

    def relative_backing(self, from_volume_path: str, to_volume_path: str) -> str:
        self._own(from_volume_path, "from_volume_path")
        if not isinstance(to_volume_path, str) or not os.path.isabs(to_volume_path):
            raise InvalidParameter(
                f"an absolute path, not {to_volume_path!r}", name="to_volume_path"
            )
        # The kernel resolves ".." after following symlinks, so the reference is computed between
        # real paths: a repository reached through a symlink still gets one that works.
        start = os.path.realpath(os.path.dirname(from_volume_path))
        return os.path.relpath(os.path.realpath(to_volume_path), start)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def describe(self) -> dict[str, Any]:
        st = os.statvfs(self.root)
        return {
            "format": f"{self.format_name}-{self.format_version}",
            "version": self.format_version,
            "path": self.root,
            "free_bytes": st.f_bavail * st.f_frsize,
            "total_bytes": st.f_blocks * st.f_frsize,
        }

    def _own(self, path: object, name: str) -> tuple[str, str, str | None]:
        """Id, format and tag of one of this repository's files, else InvalidParameter."""
        if isinstance(path, str) and os.path.dirname(path) == self.volumes_dir:
            parsed = _parse(os.path.basename(path))
            if parsed is not None:
                return parsed
        raise InvalidParameter(
            f"a volume or temporary file of the repository {self.root}, not {path!r}", name=name
        )


def _root(connection_parameters: Mapping[str, object]) -> str:
    if not isinstance(connection_parameters, Mapping):
        raise InvalidParameter(
            f"a mapping such as {{'path': '/srv/repo1'}}, not {connection_parameters!r}",
            name="connection_parameters",
        )
    unknown = sorted(str(k) for k in connection_parameters if k != "path")
    if unknown:
        raise InvalidParameter(
            f"localfs takes only 'path', not {', '.join(unknown)}", name="connection_parameters"
        )
    path = connection_parameters.get("path")
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise InvalidParameter(f"an absolute directory path, not {path!r}", name="path")
    root = os.path.normpath(path)
    if not os.path.isdir(root):
        # Never created here: a missing mount point must not turn into a repository on the
        # local disk underneath it.
        raise InvalidParameter(f"{root} is not an existing directory", name="path")
    return root


def _parse(name: str) -> tuple[str, str, str | None] | None:
    if match := _VOLUME_NAME.fullmatch(name):
        return match[1], match[2], None
    if match := _TEMP_NAME.fullmatch(name):
        return match[1], match[2], match[3]
    return None


def _read_marker(root: str) -> str:
    """The ``<format>-<version>`` a marker names, or a description of what is wrong with it."""
    try:
        with open(os.path.join(root, MARKER), "rb") as f:
            marker = json.loads(f.read(4096))
        return f"{marker['format']}-{marker['version']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable marker ({type(e).__name__})"


def _write_marker(root: str, content: dict[str, str]) -> None:
    final = os.path.join(root, MARKER)
    temp = os.path.join(root, f".{MARKER}.{os.getpid()}.tmp")
    with open(temp, "wb") as f:
        f.write(json.dumps(content, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(temp, final)
    except FileExistsError:
        raise RepositoryAlreadyFormatted(path=root, found=_read_marker(root)) from None
    finally:
        os.unlink(temp)
    _fsync_directory(root)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
