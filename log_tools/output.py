"""Where the tools write: a file the user names, outside the repository, replaced whole.

The tools only read the repository (README, Tools): an export or a drawing that would land in
it (the repository's directory, or the log directory when PATH is a bare log) is refused
before anything is read. The file is written under a temporary name beside it and renamed
into place, so a run that fails, however it fails, leaves neither half a file nor the
temporary.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from engine.errors import InvalidParameter
from log_tools.paths import repository_root


def writable_target(path: str, target: str, *, name: str, replace: bool) -> str:
    """``target`` made absolute, once it names a file the tools may write for the log at
    ``path``; ``name`` is the argument's, for the message."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise InvalidParameter(f"{parent} is not a directory", name=name)
    if os.path.isdir(target):
        raise InvalidParameter(f"{target} is a directory; name a file to write", name=name)
    if os.path.lexists(target) and not replace:
        raise InvalidParameter(f"{target} exists; pass --replace to overwrite it", name=name)
    # PATH itself when it is a log directory outside any repository (or holds a bare log/).
    protected = os.path.realpath(repository_root(path) or path)
    real_parent = os.path.realpath(parent)
    if os.path.commonpath([real_parent, protected]) == protected:
        raise InvalidParameter(
            f"{target} is inside {protected}, which the tools only read; write it elsewhere",
            name=name,
        )
    return target


@contextlib.contextmanager
def replacing(target: str) -> Iterator[str]:
    """A new, empty temporary file beside ``target`` to write: renamed onto ``target`` when
    the block ends without an error, removed in every other case."""
    directory, base = os.path.split(target)
    temporary = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never someone else's file; 0o666 less the umask, as the file itself would be.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
