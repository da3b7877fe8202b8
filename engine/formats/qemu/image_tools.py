"""The one adapter around QEMU's image tools: every ``qemu-img`` and ``qemu-io`` run starts here.

Image files are passed as absolute paths (so a name can never read as an option or as a QEMU
protocol such as ``nbd:``), commands never go through a shell, and image formats should be given
explicitly: probing a guest-writable raw file is how a guest gets the host to follow a backing
file of its choosing. Every failure comes back as a :class:`QemuError` with the command, its exit
code and the tail of its standard error.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from engine.errors import (
    InvalidParameter,
    QemuCancelled,
    QemuError,
    QemuTimeout,
    VolumeFileNotFound,
)
from engine.formats.qemu import args as checked
from engine.formats.qemu.args import check_image_format
from engine.formats.qemu.direct_io import accepts_direct_io
from engine.formats.qemu.process import Progress, execute, failure

DEFAULT_TIMEOUT = 120.0  # for commands that touch metadata only; data copies default to none

# qemu-img's words when the kernel refuses an O_DIRECT write (EINVAL: a misaligned or
# unsupported direct write) after the open accepted O_DIRECT.
_DIRECT_WRITE_REFUSED = re.compile(r"Invalid argument")
_NOT_SUPPORTED = 63  # qemu-img check: "This image format does not support checks"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What ``qemu-img check`` found. ``supported`` is False for formats it cannot check (raw)."""

    supported: bool
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    image_end_offset: int | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0 and self.check_errors == 0


@dataclass(frozen=True, slots=True)
class Measurement:
    """Bytes a converted or new image needs: as it would be written, and fully allocated."""

    required: int
    fully_allocated: int


def allocated_bytes(path: str) -> int:
    """Bytes the file occupies on its filesystem; holes of a sparse file cost nothing."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        raise VolumeFileNotFound(path=path) from None


class QemuImg:
    """``qemu-img`` and ``qemu-io`` at injectable paths; ``timeout`` bounds metadata commands."""

    def __init__(
        self,
        qemu_img: str = "qemu-img",
        qemu_io: str = "qemu-io",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        copy_rate: int = 0,
    ) -> None:
        self.qemu_img = qemu_img
        self.qemu_io = qemu_io
        self.timeout = timeout
        # Bytes of data a second that a copy through QEMU's block layer (a checkpointed copy,
        # engine/executors/checkpointed_copy.py) may read; 0: as fast as it goes. What
        # ``convert -r`` is to qemu-img: tests slow copies down to stop them in the middle.
        self.copy_rate = copy_rate

    # --- images ---------------------------------------------------------------------------

    def create(
        self,
        path: str,
        fmt: str,
        size: int | None,
        *,
        backing: str | None = None,
        backing_fmt: str | None = None,
        preallocation: str | None = None,
        cluster_size: int | None = None,
        unsafe: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        """Create (or replace) an image; ``backing`` is relative to ``path``'s directory.

        ``size`` may be None for an overlay: it then takes its backing file's size. ``unsafe``
        (``-u``) does not open the backing file: an overlay of a volume a running daemon writes
        (which holds its lock) is made so, with its size given.
        """
        path = checked.file(path)
        check_image_format(fmt)
        args = [self.qemu_img, "create", "-q", "-f", fmt]
        if backing is not None:
            if fmt != "qcow2":
                raise InvalidParameter(f"only qcow2 images have one, not {fmt}", name="backing")
            args += ["-b", checked.backing(path, backing, backing_fmt), "-F", str(backing_fmt)]
            if unsafe:
                if size is None:
                    raise InvalidParameter("required for an overlay made unsafely", name="size")
                args.append("-u")
        elif size is None:
            raise InvalidParameter("required for an image without a backing file", name="size")
        options = checked.options(fmt, preallocation)
        if cluster_size is not None:
            if fmt != "qcow2" or not checked.power_of_two(cluster_size, 512, 2**21):
                raise InvalidParameter(
                    f"a power of two from 512 to 2 MiB, for qcow2 only: {cluster_size!r}",
                    name="cluster_size",
                )
            options.append(f"cluster_size={cluster_size}")
        if options:
            args += ["-o", ",".join(options)]
        args.append(path)
        if size is not None:
            args.append(str(checked.size(size)))
        self._run(args, timeout=self.timeout, cancel=cancel)

    @overload
    def info(
        self, path: str, *, chain: Literal[False] = False, fmt: str | None = None
    ) -> dict[str, Any]: ...
    @overload
    def info(
        self, path: str, *, chain: Literal[True], fmt: str | None = None
    ) -> list[dict[str, Any]]: ...
    def info(
        self, path: str, *, chain: bool = False, fmt: str | None = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``qemu-img info`` as JSON, readable while a virtual machine uses the image (``-U``).

        With ``chain``, a list from the image down to its last backing file.
        """
        args = [self.qemu_img, "info", "--output=json", "-U", *checked.format_flag("-f", fmt)]
        if chain:
            args.append("--backing-chain")
        out = self._run([*args, checked.existing(path)], timeout=self.timeout)[1]
        result: dict[str, Any] | list[dict[str, Any]] = json.loads(out)
        return result

    def convert(
        self,
        src: str,
        dst: str,
        *,
        src_fmt: str,
        dst_fmt: str,
        backing: str | None = None,
        backing_fmt: str | None = None,
        preallocation: str | None = None,
        sparse: bool = True,
        existing_target: bool = False,
        direct: bool = False,
        progress: Progress | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Copy ``src`` into ``dst`` (created, or reused as is with ``existing_target``).

        With ``backing`` (relative to ``dst``'s directory), only what ``src``'s top volume holds
        is copied and the rest is left to that backing file, which must hold the same content as
        ``src``'s backing chain. ``sparse=False`` writes zeroes out instead of leaving holes.

        ``direct`` writes ``dst`` around the page cache (``-t none``, docs/adr/0006) where its
        filesystem allows it, and through it where not: qemu-img then flushes ``dst`` before it
        exits, so a caller's fsync finds nothing left to write back. A raw ``dst`` is then also
        written out of order (``-W``): its offsets fix its layout, so only the speed changes,
        where a qcow2 one would get its clusters in the order the writes happened to complete.
        """
        check_image_format(src_fmt)
        check_image_format(dst_fmt)
        dst = checked.file(dst)
        args = [self.qemu_img, "convert", "-f", src_fmt, "-O", dst_fmt]
        if existing_target:
            if backing is not None or preallocation is not None:
                raise InvalidParameter(
                    "an existing target keeps its own backing file and preallocation",
                    name="existing_target",
                )
            args.append("-n")
        if not sparse:
            args += ["-S", "0"]
        if backing is not None:
            args += ["-B", checked.backing(dst, backing, backing_fmt), "-F", str(backing_fmt)]
        options = checked.options(dst_fmt, preallocation)
        if options:
            args += ["-o", ",".join(options)]
        src = checked.existing(src)
        run: dict[str, Any] = {"timeout": timeout, "progress": progress, "cancel": cancel}
        if not (direct and accepts_direct_io(dst, create=not existing_target)):
            self._run(checked.with_progress([*args, src, dst], progress), **run)
            return
        direct_args = [*args, "-t", "none", *(["-W"] if dst_fmt == "raw" else []), src, dst]
        try:
            self._run(checked.with_progress(direct_args, progress), **run)
        except (QemuCancelled, QemuTimeout):
            raise
        except QemuError as e:
            # Some filesystems (FUSE ones, some network ones) accept O_DIRECT at open() and
            # then fail the writes with EINVAL: the probe cannot see that. The copy is whole
            # work (qemu-img writes all of dst again), so it is redone through the page cache.
            if not _DIRECT_WRITE_REFUSED.search(e.stderr):
                raise
            self._run(checked.with_progress([*args, src, dst], progress), **run)

    def rebase(
        self,
        path: str,
        backing: str | None,
        *,
        backing_fmt: str | None = None,
        fmt: str | None = None,
        safe: bool = True,
        old_backing: str | None = None,
        old_backing_fmt: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Point ``path`` at ``backing`` (relative to ``path``'s directory; None: no backing).

        In safe mode the old and new backing chains are compared and every cluster where they
        differ is written into ``path``, so its content is unchanged; ``safe=False`` only
        rewrites the reference (for a backing file that was moved, not changed).

        The old chain is the one ``path``'s header names, or ``old_backing`` (named like
        ``backing``; ``fmt`` is then required) whatever the header says. qemu-img writes the
        new header before the tables of the clusters it copied: killed between the two, it
        leaves ``path`` pointing at ``backing`` without that data, and only a run that is told
        the old backing can copy it again.
        """
        path = checked.existing(path)
        new = "" if backing is None else checked.backing(path, backing, backing_fmt)
        new_fmt = checked.format_flag("-F", backing_fmt if new else None)
        if old_backing is None:
            args = [self.qemu_img, "rebase", *checked.format_flag("-f", fmt), *checked.unsafe(safe)]
            args += ["-b", new, *new_fmt, path]
            self._run(
                checked.with_progress(args, progress),
                timeout=timeout,
                progress=progress,
                cancel=cancel,
            )
            return
        old = checked.backing(path, old_backing, old_backing_fmt)
        # Opened over another backing than its header's, the image has no file name of its own
        # for qemu-img to resolve a relative backing name against: name the new backing by its
        # absolute path, then put the relative name in the header (the same file either way).
        absolute = new and os.path.join(os.path.dirname(path), new)
        args = [
            self.qemu_img,
            "rebase",
            "--image-opts",
            *checked.unsafe(safe),
            "-b",
            absolute,
            *new_fmt,
        ]
        args.append(checked.with_backing(path, fmt, old, old_backing_fmt))
        self._run(
            checked.with_progress(args, progress), timeout=timeout, progress=progress, cancel=cancel
        )
        if absolute != new:
            args = [
                self.qemu_img,
                "rebase",
                *checked.format_flag("-f", fmt),
                "-u",
                "-b",
                new,
                *new_fmt,
            ]
            self._run([*args, path], timeout=self.timeout, cancel=cancel)

    def commit(
        self,
        path: str,
        *,
        base: str | None = None,
        fmt: str | None = None,
        keep: bool = False,
        rate_limit: int = 0,
        progress: Progress | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Write ``path``'s data down into its backing file, or into ``base`` deeper in the chain.

        ``base`` is named as the chain names it (absolute, or relative to ``path``'s directory).
        ``keep`` (``-d``) leaves ``path``'s clusters as they are instead of emptying it, so
        the commit can simply run again after a crash: it reads the same data again.
        ``rate_limit`` (``-r``) is bytes per second, 0 for none.
        """
        args = [self.qemu_img, "commit", *checked.format_flag("-f", fmt)]
        if base is not None:
            args += ["-b", base]
        if keep:
            args.append("-d")
        if rate_limit:
            args += ["-r", str(checked.size(rate_limit))]
        args.append(checked.existing(path))
        self._run(
            checked.with_progress(args, progress), timeout=timeout, progress=progress, cancel=cancel
        )

    def compare(
        self,
        a: str,
        b: str,
        *,
        strict: bool = False,
        a_fmt: str | None = None,
        b_fmt: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Whether the two images read the same. ``strict`` also tells different sizes apart
        and an allocated zero cluster from a hole."""
        args = [self.qemu_img, "compare", "-q", *checked.format_flag("-f", a_fmt)]
        args += checked.format_flag("-F", b_fmt)
        if strict:
            args.append("-s")
        code = self._run(
            [*args, checked.existing(a), checked.existing(b)], timeout=timeout, ok=(0, 1)
        )[0]
        return code == 0

    def compare_volumes(self, a: str, b: str, fmt: str, *, timeout: float | None = None) -> bool:
        """Whether two volumes hold the same data of their own: each opened alone (no backing,
        so what it leaves to a backing reads as zeros) and shared with a writer that may hold
        ``a`` open (the storage daemon serving it). For copies of one immutable volume."""
        fmt = check_image_format(fmt)

        def alone(path: str) -> str:
            options: dict[str, Any] = {
                "driver": fmt,
                "file": {"driver": "file", "filename": os.path.abspath(checked.existing(path))},
            }
            if fmt == "qcow2":
                options["backing"] = None
            return "json:" + json.dumps(options)

        args = [self.qemu_img, "compare", "-q", "-U", alone(a), alone(b)]
        return self._run(args, timeout=timeout, ok=(0, 1))[0] == 0

    def check(
        self,
        path: str,
        *,
        fmt: str | None = None,
        repair_leaks: bool = False,
        cancel: threading.Event | None = None,
    ) -> CheckResult:
        """``qemu-img check``: corruptions and leaks are a result, not an exception.
        ``repair_leaks`` (``-r leaks``) frees clusters that nothing references: what a qcow2
        writer killed between allocating clusters and recording them leaves (harmless, but
        space). It reads all of a qcow2 volume's tables, so ``cancel`` may stop it
        (QemuCancelled)."""
        args = [
            self.qemu_img,
            "check",
            "--output=json",
            *(["-r", "leaks"] if repair_leaks else []),
            *checked.format_flag("-f", fmt),
            checked.existing(path),
        ]
        code, out, _ = self._run(
            args, timeout=self.timeout, ok=(0, 2, 3, _NOT_SUPPORTED), cancel=cancel
        )
        if code == _NOT_SUPPORTED:
            return CheckResult(supported=False)
        report: dict[str, Any] = json.loads(out)
        return CheckResult(
            supported=True,
            corruptions=report.get("corruptions", 0),
            leaks=report.get("leaks", 0),
            check_errors=report.get("check-errors", 0),
            image_end_offset=report.get("image-end-offset"),
            report=report,
        )

    def map(self, path: str, *, fmt: str | None = None) -> list[dict[str, Any]]:
        """Extents of the image's chain: ``depth`` 0 is data the image itself holds."""
        args = [self.qemu_img, "map", "--output=json", "-U", *checked.format_flag("-f", fmt)]
        extents: list[dict[str, Any]] = json.loads(
            self._run([*args, checked.existing(path)], timeout=self.timeout)[1]
        )
        return extents

    def measure(
        self,
        *,
        out_fmt: str,
        path: str | None = None,
        fmt: str | None = None,
        size: int | None = None,
        preallocation: str | None = None,
    ) -> Measurement:
        """Space a copy of ``path`` (or a new image of ``size`` bytes) would need as ``out_fmt``."""
        check_image_format(out_fmt)
        args = [self.qemu_img, "measure", "--output=json", "-O", out_fmt]
        options = checked.options(out_fmt, preallocation)
        if options:
            args += ["-o", ",".join(options)]
        if (path is None) == (size is None):
            raise InvalidParameter("give exactly one of path and size", name="measure")
        if path is not None:
            args += [*checked.format_flag("-f", fmt), checked.existing(path)]
        else:
            args += ["--size", str(checked.size(size))]
        result = json.loads(self._run(args, timeout=self.timeout)[1])
        return Measurement(result["required"], result["fully-allocated"])

    def resize(
        self, path: str, size: int, *, fmt: str, cancel: threading.Event | None = None
    ) -> None:
        """Grow the image to ``size`` bytes; shrinking would destroy data and is refused."""
        current = self.info(path, fmt=fmt)["virtual-size"]
        if checked.size(size) < current:
            raise InvalidParameter(
                f"{size} is smaller than the image's {current} bytes", name="size"
            )
        if size > current:
            args = [self.qemu_img, "resize", "-q", "-f", fmt, checked.existing(path), str(size)]
            self._run(args, timeout=self.timeout, cancel=cancel)

    # --- qemu-io, for tests and the demo --------------------------------------------------

    def write_pattern(self, path: str, fmt: str, offset: int, length: int, pattern: int) -> None:
        """Fill ``length`` bytes at ``offset`` with the byte ``pattern``, as a guest would."""
        command = (
            f"write -P {checked.byte(pattern)} {checked.offset(offset)} {checked.size(length)}"
        )
        args = [self.qemu_io, "-f", check_image_format(fmt), "-c", command, checked.existing(path)]
        self._run(args, timeout=self.timeout)

    def read_pattern_matches(
        self, path: str, fmt: str, offset: int, length: int, pattern: int
    ) -> bool:
        """Whether every byte of the range reads as ``pattern``."""
        command = f"read -P {checked.byte(pattern)} {checked.offset(offset)} {checked.size(length)}"
        fmt = check_image_format(fmt)
        args = [self.qemu_io, "-r", "-U", "-f", fmt, "-c", command, checked.existing(path)]
        code, out, _ = self._run(args, timeout=self.timeout, ok=(0, 1))
        if code == 1 and b"Pattern verification failed" not in out:
            raise failure(args, code, out)  # an I/O error, not a mismatch
        return code == 0

    # --- running --------------------------------------------------------------------------

    def _run(
        self,
        args: Sequence[str],
        *,
        timeout: float | None,
        progress: Progress | None = None,
        ok: Sequence[int] = (0,),
        cancel: threading.Event | None = None,
    ) -> tuple[int, bytes, bytes]:
        code, out, err = execute(args, timeout, progress, cancel)
        if code not in ok:
            raise failure(args, code, err)
        return code, out, err
