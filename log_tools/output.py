"""Where the tools write: a file the user names, outside the repository, replaced whole.

The tools only read the repository (README, Tools): an export or a drawing that would land in
it (the repository's directory, or the log directory when PATH is a bare log) is refused
before anything is read. The file is written under a temporary name beside it and renamed
into place, so a run that fails, however it fails, leaves neither half a file nor the
temporary. A device or a pipe (``-o /dev/stdout``) is written in place where a command allows
it: renaming onto it would put a file where the device was.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator

from engine.errors import InvalidParameter, ToolFailed
from log_tools.paths import find_log_dir, repository_root


def writable_target(path: str, target: str, *, name: str, replace: bool, devices: bool) -> str:
    """``target`` made absolute, once it names a file the tools may write for the log at
    ``path`` (or a device or pipe, when ``devices``); ``name`` is the argument's, for the
    message."""
    find_log_dir(path)  # a PATH that is no log is told so first, not taken for one to guard
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise InvalidParameter(f"{parent} is not a directory", name=name)
    if os.path.isdir(target):
        raise InvalidParameter(f"{target} is a directory; name a file to write", name=name)
    if _special(target) and not devices:
        raise InvalidParameter(f"{target} is not a regular file; name a file to write", name=name)
    if os.path.lexists(target) and not replace:
        raise InvalidParameter(f"{target} exists; pass --replace to overwrite it", name=name)
    # PATH itself when it is a log directory outside any repository (or holds a bare log/).
    protected = os.path.realpath(repository_root(path) or path)
    for place in (os.path.realpath(parent), os.path.realpath(target)):
        if os.path.commonpath([place, protected]) == protected:
            raise InvalidParameter(
                f"{target} is inside {protected}, which the tools only read; write it elsewhere",
                name=name,
            )
    return target


@contextlib.contextmanager
def replacing(target: str) -> Iterator[str]:
    """A new, empty temporary file beside ``target`` to write: renamed onto ``target`` when
    the block ends without an error, removed in every other case. A device or a pipe is
    itself the file to write."""
    if _special(target):
        yield target
        return
    directory, base = os.path.split(target)
    temporary = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    ours: str | None = temporary
    # Made inside the try: a signal the moment after it is made still has it removed.
    try:
        try:
            # O_EXCL: never someone else's file; 0o666 less the umask, as the file would be.
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        except FileExistsError:
            ours = None  # another's file by the same random name: not ours to remove
            raise
        except OSError as e:
            raise ToolFailed(
                f"cannot write {target}: {e.strerror} (it is written under a temporary name in "
                f"{directory}, then renamed)"
            ) from e
        yield temporary
        _sync(temporary)  # whole on the disk before its name says it is there
        os.replace(temporary, target)
    finally:
        if ours is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ours)


def _special(target: str) -> bool:
    """Whether ``target`` exists (through a symbolic link too) and is not a regular file."""
    try:
        return not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        return False


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
