"""The ``localfs-1.0`` repository format: a directory on a POSIX filesystem (local, or NFSv4).

Layout (docs/adr/0003-repository-format-localfs.md)::

    <root>/STRATA-REPOSITORY                    {"format": "localfs", "version": "1.0"}
    <root>/log/                                 the operation log (engine.log)
    <root>/hosts/<host_id>                      each host's heartbeat (engine.executors.liveness)
    <root>/volumes/<volume_id>.<fmt>            published volumes
    <root>/volumes/.tmp-<volume_id>.<fmt>.<tag> a stage's file in progress

Imports: its own package, ``engine.errors``, ``engine.formats``, ``engine.log``; the standard
library.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from operator import attrgetter
from typing import Any

from engine.errors import (
    ForeignFile,
    InvalidParameter,
    NotARepository,
    RepositoryAlreadyFormatted,
    RepositoryFormatMismatch,
    RepositoryNotEmpty,
    VolumeAlreadyExists,
    VolumeFileNotFound,
)
from engine.formats.qemu.args import IMAGE_FORMATS, check_image_format
from engine.formats.repository.driver import (
    TAG,
    VOLUME_ID,
    RepositoryFormat,
    RepositoryStorage,
    VolumeFile,
    check_tag,
    check_volume_id,
)
from engine.log import OperationLog

MARKER = "STRATA-REPOSITORY"
LOG_DIR = "log"
VOLUMES_DIR = "volumes"
HOSTS_DIR = "hosts"  # the hosts' heartbeats (engine/executors/liveness.py)
TEMP_PREFIX = ".tmp-"
# Left by mkfs at the root of a filesystem: formatting a fresh mount point must work.
_IGNORED_WHEN_EMPTY = frozenset({"lost+found"})

_FORMATS = "|".join(IMAGE_FORMATS)
_VOLUME_NAME = re.compile(rf"({VOLUME_ID.pattern})\.({_FORMATS})")
_TEMP_NAME = re.compile(
    rf"{re.escape(TEMP_PREFIX)}({VOLUME_ID.pattern})\.({_FORMATS})\.({TAG.pattern})"
)
_by_path = attrgetter("path")


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
        # The root may be a link (a path such as /srv/repo1 often is); what is inside is not
        # followed: the log would be appended to, and heartbeats written, wherever links led.
        # The volume directory is checked at each use instead, so that a repository whose
        # volume directory is a link still connects and its check can report it.
        _check_not_linked(root, MARKER, directory=False)
        if not os.path.exists(os.path.join(root, MARKER)):
            raise NotARepository(f"no {MARKER} marker", path=root)
        found, expected = _read_marker(root), f"{cls.name}-{cls.version}"
        if found != expected:
            raise RepositoryFormatMismatch(path=root, found=found, expected=expected)
        _check_not_linked(root, LOG_DIR, directory=True)
        _check_not_linked(root, HOSTS_DIR, directory=True)
        for sub in (LOG_DIR, VOLUMES_DIR):
            if not os.path.isdir(os.path.join(root, sub)):
                raise NotARepository(f"its marker is there but {sub}/ is missing", path=root)
        return LocalStorage(root, cls.name, cls.version)


class LocalStorage(RepositoryStorage):
    """An open ``localfs`` repository rooted at an absolute, normalized ``root``.

    The root may be reached through a symbolic link; nothing inside it is: every volume file
    is looked up relative to the volume directory opened with ``O_NOFOLLOW``, and a link, a
    file with other names outside the repository (a hard link) or a name that is not a regular
    file is foreign (docs/adr/0016-links-inside-a-repository.md).
    """

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
        files: list[VolumeFile] = []
        shared: list[tuple[int, os.stat_result]] = []  # files of more than one name: rare
        with self._volumes() as directory:
            with os.scandir(directory) as entries:
                for entry in entries:
                    parsed = _parse(entry.name)
                    if parsed is None:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we looked: it is not there any more
                    volume_id, fmt, tag = parsed
                    foreign = None
                    if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                        foreign = _foreign(directory, entry.name, st, st.st_nlink)
                        if foreign is None:
                            shared.append((len(files), st))
                    path = os.path.join(self.volumes_dir, entry.name)
                    files.append(
                        VolumeFile(
                            volume_id,
                            fmt,
                            path,
                            st.st_size,
                            st.st_blocks * 512,
                            tag is not None,
                            tag,
                            foreign,
                            (st.st_ino, st.st_mtime_ns, st.st_ctime_ns),
                        )
                    )
            # A volume has two names between the two steps of a publish: count the names each
            # such file has here, so that only a name elsewhere makes it foreign.
            names: dict[tuple[int, str], int] = {}
            for at, st in shared:
                key = (st.st_ino, files[at].volume_id)
                names[key] = names.get(key, 0) + 1
            for at, st in shared:
                name = os.path.basename(files[at].path)
                here = names[(st.st_ino, files[at].volume_id)]
                files[at] = replace(files[at], foreign=_foreign(directory, name, st, here))
        files.sort(key=_by_path)
        return files

    def temporaries_of(self, volume_id: str) -> list[VolumeFile]:
        check_volume_id(volume_id)
        prefix = f"{TEMP_PREFIX}{volume_id}."
        found = []
        with self._volumes() as directory:
            for name in os.listdir(directory):  # names only: a stat for just the matches
                if not name.startswith(prefix) or (parsed := _parse(name)) is None:
                    continue
                try:
                    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                foreign = _foreign(directory, name, st, _names(directory, st, volume_id))
                path = os.path.join(self.volumes_dir, name)
                found.append(
                    VolumeFile(
                        parsed[0],
                        parsed[1],
                        path,
                        st.st_size,
                        st.st_blocks * 512,
                        True,
                        parsed[2],
                        foreign,
                    )
                )
        return sorted(found, key=lambda f: f.path)

    def check_own_file(self, path: str) -> None:
        self._own(path, "path")
        with self._volumes() as directory:
            _own_stat(directory, path)

    def publish(self, temp_path: str, final_path: str) -> None:
        temp, final = self._temporary_of(temp_path, final_path)
        with self._volumes() as directory:
            temp_stat = _own_stat(directory, temp_path)
            if temp_stat is None:
                raise VolumeFileNotFound(path=temp_path)
            _fsync_file(directory, temp)  # the data is durable before the name says it is complete
            try:
                # link() fails if the name exists, where rename() would silently replace a
                # volume; it links the temporary name itself, never what a link names.
                os.link(
                    temp, final, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False
                )
            except FileNotFoundError:
                raise VolumeFileNotFound(path=temp_path) from None
            except FileExistsError:
                final_stat = _own_stat(directory, final_path)
                if final_stat is None or not os.path.samestat(temp_stat, final_stat):
                    raise VolumeAlreadyExists(path=final_path) from None
            os.fsync(directory)
            os.unlink(temp, dir_fd=directory)
            os.fsync(directory)

    def replace(self, temp_path: str, final_path: str) -> None:
        temp, final = self._temporary_of(temp_path, final_path)
        with self._volumes() as directory:
            temp_stat = _own_stat(directory, temp_path)
            if temp_stat is None:
                raise VolumeFileNotFound(path=temp_path)
            final_stat = _own_stat(directory, final_path)
            if final_stat is None:
                raise VolumeFileNotFound(path=final_path)
            if os.path.samestat(temp_stat, final_stat):
                # Two names of one file (a publish killed between its steps): rename() would
                # do nothing and leave the temporary name; the volume is the file already.
                os.unlink(temp, dir_fd=directory)
                os.fsync(directory)
                return
            _fsync_file(directory, temp)  # the data is durable before the name says so
            os.rename(temp, final, src_dir_fd=directory, dst_dir_fd=directory)
            os.fsync(directory)

    def retag(self, temp_path: str, new_temp_path: str) -> None:
        old_id, old_fmt, old_tag = self._own(temp_path, "temp_path")
        new_id, new_fmt, new_tag = self._own(new_temp_path, "new_temp_path")
        if old_tag is None or new_tag is None or (old_id, old_fmt) != (new_id, new_fmt):
            raise InvalidParameter(
                f"{temp_path} and {new_temp_path} are not temporary files of one volume",
                name="new_temp_path",
            )
        old, new = os.path.basename(temp_path), os.path.basename(new_temp_path)
        with self._volumes() as directory:
            if _own_stat(directory, temp_path) is None:
                raise VolumeFileNotFound(path=temp_path)
            try:
                # link() never replaces a file, where rename() would.
                os.link(old, new, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                raise VolumeFileNotFound(path=temp_path) from None
            except FileExistsError:
                raise VolumeAlreadyExists(path=new_temp_path) from None
            os.unlink(old, dir_fd=directory)
            os.fsync(directory)

    def copy_in(
        self,
        source_path: str,
        temp_path: str,
        *,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if self._own(temp_path, "temp_path")[2] is None:
            raise InvalidParameter(
                f"a temporary file of the repository {self.root}, not the volume {temp_path}",
                name="temp_path",
            )
        if not isinstance(source_path, str) or not os.path.isabs(source_path):
            raise InvalidParameter(f"an absolute path, not {source_path!r}", name="source_path")
        try:
            # Another repository's volume: a link there is not followed either (ADR 0016).
            src = os.open(source_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VolumeFileNotFound(path=source_path) from None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise ForeignFile(path=source_path, what="a symbolic link") from None
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise ForeignFile(path=source_path, what="not a regular file")
            with self._volumes() as directory:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    out = os.open(os.path.basename(temp_path), flags, 0o644, dir_fd=directory)
                except FileExistsError:
                    # An earlier attempt's: the caller removes it first (never written through).
                    raise VolumeAlreadyExists(path=temp_path) from None
            try:
                if _copy_data(src, out, progress, cancel):
                    os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(src)

    def remove(self, path: str) -> None:
        self._own(path, "path")
        with self._volumes() as directory:
            # A link is foreign: left for a person to look at, not unlinked as if it were ours.
            if _own_stat(directory, path) is None:
                return
            try:
                os.unlink(os.path.basename(path), dir_fd=directory)
            except FileNotFoundError:
                return
            os.fsync(directory)

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

    def _temporary_of(self, temp_path: str, final_path: str) -> tuple[str, str]:
        """The names of ``temp_path`` and ``final_path``, if the first is a temporary file of
        the volume the second names; else InvalidParameter."""
        temp_id, temp_fmt, tag = self._own(temp_path, "temp_path")
        final_id, final_fmt, final_tag = self._own(final_path, "final_path")
        if tag is None or final_tag is not None or (temp_id, temp_fmt) != (final_id, final_fmt):
            raise InvalidParameter(
                f"{temp_path} is not the temporary file of {final_path}", name="temp_path"
            )
        return os.path.basename(temp_path), os.path.basename(final_path)

    def _own(self, path: object, name: str) -> tuple[str, str, str | None]:
        """Id, format and tag of one of this repository's files, else InvalidParameter."""
        if isinstance(path, str) and os.path.dirname(path) == self.volumes_dir:
            parsed = _parse(os.path.basename(path))
            if parsed is not None:
                return parsed
        raise InvalidParameter(
            f"a volume or temporary file of the repository {self.root}, not {path!r}", name=name
        )

    @contextmanager
    def _volumes(self) -> Iterator[int]:
        """The volume directory as a descriptor, opened without following a link there."""
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            directory = os.open(VOLUMES_DIR, flags, dir_fd=root)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            st = os.stat(VOLUMES_DIR, dir_fd=root, follow_symlinks=False)
            what = _link(root, VOLUMES_DIR) if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise ForeignFile(path=self.volumes_dir, what=what) from None
        finally:
            os.close(root)
        try:
            yield directory
        finally:
            os.close(directory)


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


def _own_stat(directory: int, path: str) -> os.stat_result | None:
    """The file of ``path`` (a name in the volume directory ``directory``), or None if there is
    none; :class:`ForeignFile` if it is not the repository's own."""
    name = os.path.basename(path)
    parsed = _parse(name)
    volume_id = parsed[0] if parsed is not None else ""
    foreign = None
    # Twice: a publish that ends between the stat and the count of names (its temporary name
    # unlinked) leaves a file of two names of which one is found; the second look finds one.
    for _ in range(2):
        try:
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return None
        foreign = _foreign(directory, name, st, _names(directory, st, volume_id))
        if foreign is None:
            return st
    raise ForeignFile(path=path, what=str(foreign))


def _names(directory: int, st: os.stat_result, volume_id: str) -> int:
    """How many of the volume's names (published and temporary) in the directory are the file
    ``st``: 1 without a stat for a file of one name, as nearly every file is."""
    if st.st_nlink == 1:
        return 1
    count = 0
    for name in os.listdir(directory):
        parsed = _parse(name)
        if parsed is None or parsed[0] != volume_id:
            continue
        try:
            if os.path.samestat(st, os.stat(name, dir_fd=directory, follow_symlinks=False)):
                count += 1
        except FileNotFoundError:
            continue
    return count


def _foreign(directory: int, name: str, st: os.stat_result, names: int) -> str | None:
    """Why the volume file ``name`` is not the repository's own, or None if it is. ``names``:
    how many of its volume's names in the directory are this file."""
    if stat.S_ISLNK(st.st_mode):
        return _link(directory, name)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink != names:
        return (
            f"a hard link: the file has {st.st_nlink} names and {names} of them are this "
            "volume's in the repository"
        )
    return None


def _link(directory: int, name: str) -> str:
    try:
        return f"a symbolic link to {os.readlink(name, dir_fd=directory)!r}"
    except OSError:
        return "a symbolic link"


def _check_not_linked(root: str, name: str, *, directory: bool) -> None:
    """Refuse a link, or the wrong kind of file, where the repository keeps ``name``; a missing
    one is for the caller to notice."""
    path = os.path.join(root, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            what = f"a symbolic link to {os.readlink(path)!r}"
        except OSError:
            what = "a symbolic link"
        raise ForeignFile(path=path, what=what)
    if directory and not stat.S_ISDIR(st.st_mode):
        raise ForeignFile(path=path, what="not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise ForeignFile(path=path, what="not a regular file")


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


_COPY_CHUNK = 64 * 1024 * 1024


def _copy_data(
    src: int,
    out: int,
    progress: Callable[[int], None] | None,
    cancel: threading.Event | None,
) -> bool:
    """Copy the data extents of ``src`` (SEEK_DATA/SEEK_HOLE) with ``copy_file_range``: the
    holes stay holes, and the kernel moves the bytes (a reflink where the filesystem can).
    False if ``cancel`` stopped it."""
    size = os.fstat(src).st_size
    offset = done = flushed = 0
    copy = _copy_range
    while offset < size:
        if cancel is not None and cancel.is_set():
            return False
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
            end = os.lseek(src, start, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno != errno.EINVAL:
                raise
            start, end = offset, size  # no SEEK_DATA here: all of it is data
        position = start
        while position < end:
            if cancel is not None and cancel.is_set():
                return False
            count = min(_COPY_CHUNK, end - position)
            try:
                copied = copy(src, out, count, position)
            except OSError as e:
                # Linux copies between two filesystems only if both are of one type that
                # can (EXDEV otherwise, since 5.19): two repositories often are not.
                if copy is _write_range or e.errno not in _NO_COPY_RANGE:
                    raise
                copy = _write_range
                continue
            if copied == 0:
                raise OSError(errno.EIO, f"the source ended at {position}, not {end}")
            position += copied
            done += copied
            if done - flushed >= _FLUSH_EVERY:
                # Written back as it goes: one fsync of a GiB of dirty pages at the end held a
                # virtual machine's direct writes on the same disk for half a second.
                os.fdatasync(out)
                flushed = done
            if progress is not None:
                progress(done)
        offset = end
    os.ftruncate(out, size)
    return True


_FLUSH_EVERY = 64 * 1024 * 1024


_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _copy_range(src: int, out: int, count: int, position: int) -> int:
    return os.copy_file_range(src, out, count, position, position)


def _write_range(src: int, out: int, count: int, position: int) -> int:
    """What copy_file_range does, through this process: for a copy between filesystems."""
    data = os.pread(src, min(count, _WRITE_CHUNK), position)
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(out, view[written:], position + written)
    return len(data)


_WRITE_CHUNK = 4 * 1024 * 1024


def _fsync_file(directory: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
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
