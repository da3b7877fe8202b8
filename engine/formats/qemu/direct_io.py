"""Whether a file can be written around the page cache (``O_DIRECT``, qemu-img's ``-t none``).

Linux decides at ``open()``: a filesystem without direct I/O (tmpfs before Linux 6.6, some FUSE
filesystems) refuses ``O_DIRECT`` there with ``EINVAL``, which is exactly where ``qemu-img -t
none`` would fail. Asking the kernel the same question on the very file qemu-img will write is
therefore the whole test, and costs one open and close.

Imports: the standard library only.
"""

from __future__ import annotations

import os


def accepts_direct_io(path: str, *, create: bool) -> bool:
    """Whether ``path`` opens for writing with ``O_DIRECT``; with ``create``, made if missing.

    Any refusal is a False, not an error: the caller then writes through the page cache as it
    would have anyway, and a real problem (a missing directory, no permission) is reported by
    whatever writes the file next, in the same words as without this question.
    """
    flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True
