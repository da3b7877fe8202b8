"""Real storage faults for tests: a small loop-mounted ext4 filesystem that can be filled up,
freed again, or forced read-only.

Needs root, ``mkfs.ext4`` and a loop device; :func:`skip_reason` says what is missing so that a
test skips with that reason instead of failing on a machine without them. Every mount is undone
by :meth:`SmallFs.destroy`, which the fixtures call even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time

FILLER = ".filler"  # the file that takes up the free space, outside any repository


def skip_reason() -> str | None:
    """Why loop-mounted filesystems cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to mount a loop device"
    if shutil.which("mkfs.ext4") is None:
        return "needs mkfs.ext4 (e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control)"
    return None


class SmallFs:
    """An ext4 filesystem of ``size_mib`` MiB in an image file, mounted at ``path``."""

    def __init__(self, workdir: str, size_mib: int = 64) -> None:
        self.image = os.path.join(workdir, "smallfs.img")
        self.path = os.path.join(workdir, "mnt")
        os.makedirs(self.path, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(size_mib * 2**20)
        # No reserved blocks, so that root fills it up like anyone else; no lazy init threads.
        _run(
            "mkfs.ext4", "-q", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.image
        )
        _run("mount", "-o", "loop", self.image, self.path)
        self.mounted = True

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take up the free space but ``leave`` bytes (rounded to blocks) with a filler file."""
        filler = os.path.join(self.path, FILLER)
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = b"\0" * 2**20
            while self.free_bytes() > leave:
                want = min(len(chunk), self.free_bytes() - leave)
                try:
                    os.write(fd, chunk[: max(want, 4096)])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
            os.fsync(fd)
        finally:
            os.close(fd)

    def unfill(self) -> None:
        """Free the space that :meth:`fill` took."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, FILLER))
        os.sync()

    def force_read_only(self) -> None:
        """Make the filesystem read-only under its open files (ext4's ``abort``): every write,
        sync and create fails with EROFS from now on; it cannot be made writable again."""
        _run("mount", "-o", "remount,abort", self.path)

    def destroy(self) -> None:
        if self.mounted:
            for _ in range(50):
                if subprocess.run(["umount", self.path], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                _run("umount", "-l", self.path)
            self.mounted = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)


def eio(*args: object) -> None:
    """Stands in for a system call whose device failed (monkeypatched over ``os`` calls)."""
    raise OSError(5, "Input/output error")


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
