"""The one adapter around QEMU's image tools: every ``qemu-img`` and ``qemu-io`` run starts here.

Image files are passed as absolute paths (so a name can never read as an option or as a QEMU
protocol such as ``nbd:``), commands never go through a shell, and image formats should be given
explicitly: probing a guest-writable raw file is how a guest gets the host to follow a backing
file of its choosing. Every failure comes back as a :class:`QemuError` with the command, its exit
code and the tail of its standard error.
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
from engine.formats.direct_io import accepts_direct_io
from engine.formats.qemu_process import Progress, execute, failure

IMAGE_FORMATS = ("raw", "qcow2")
PREALLOCATION = {"raw": ("off", "falloc", "full"), "qcow2": ("off", "metadata", "falloc", "full")}
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
    ) -> None:
        self.qemu_img = qemu_img
        self.qemu_io = qemu_io
        self.timeout = timeout

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
        cancel: threading.Event | None = None,
    ) -> None:
        """Create (or replace) an image; ``backing`` is relative to ``path``'s directory.

        ``size`` may be None for an overlay: it then takes its backing file's size.
        """
        path = _file(path)
        check_image_format(fmt)
        args = [self.qemu_img, "create", "-q", "-f", fmt]
        if backing is not None:
            if fmt != "qcow2":
                raise InvalidParameter(f"only qcow2 images have one, not {fmt}", name="backing")
            args += ["-b", _backing(path, backing, backing_fmt), "-F", str(backing_fmt)]
        elif size is None:
            raise InvalidParameter("required for an image without a backing file", name="size")
        options = _options(fmt, preallocation)
        if cluster_size is not None:
            if fmt != "qcow2" or not _power_of_two(cluster_size, 512, 2**21):
                raise InvalidParameter(
                    f"a power of two from 512 to 2 MiB, for qcow2 only: {cluster_size!r}",
                    name="cluster_size",
                )
            options.append(f"cluster_size={cluster_size}")
        if options:
            args += ["-o", ",".join(options)]
        args.append(path)
        if size is not None:
            args.append(str(_size(size)))
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
        args = [self.qemu_img, "info", "--output=json", "-U", *_format_flag("-f", fmt)]
        if chain:
            args.append("--backing-chain")
        out = self._run([*args, _existing(path)], timeout=self.timeout)[1]
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
        dst = _file(dst)
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
            args += ["-B", _backing(dst, backing, backing_fmt), "-F", str(backing_fmt)]
        options = _options(dst_fmt, preallocation)
        if options:
            args += ["-o", ",".join(options)]
        src = _existing(src)
        run: dict[str, Any] = {"timeout": timeout, "progress": progress, "cancel": cancel}
        if not (direct and accepts_direct_io(dst, create=not existing_target)):
            self._run(_with_progress([*args, src, dst], progress), **run)
            return
        direct_args = [*args, "-t", "none", *(["-W"] if dst_fmt == "raw" else []), src, dst]
        try:
            self._run(_with_progress(direct_args, progress), **run)
        except (QemuCancelled, QemuTimeout):
            raise
        except QemuError as e:
            # Some filesystems (FUSE ones, some network ones) accept O_DIRECT at open() and
            # then fail the writes with EINVAL: the probe cannot see that. The copy is whole
            # work (qemu-img writes all of dst again), so it is redone through the page cache.
            if not _DIRECT_WRITE_REFUSED.search(str(e.fields.get("stderr", ""))):
                raise
            self._run(_with_progress([*args, src, dst], progress), **run)

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
        path = _existing(path)
        new = "" if backing is None else _backing(path, backing, backing_fmt)
        new_fmt = _format_flag("-F", backing_fmt if new else None)
        if old_backing is None:
            args = [self.qemu_img, "rebase", *_format_flag("-f", fmt), *_unsafe(safe)]
            args += ["-b", new, *new_fmt, path]
            self._run(
                _with_progress(args, progress), timeout=timeout, progress=progress, cancel=cancel
            )
            return
        old = _backing(path, old_backing, old_backing_fmt)
        # Opened over another backing than its header's, the image has no file name of its own
        # for qemu-img to resolve a relative backing name against: name the new backing by its
        # absolute path, then put the relative name in the header (the same file either way).
        absolute = new and os.path.join(os.path.dirname(path), new)
        args = [self.qemu_img, "rebase", "--image-opts", *_unsafe(safe), "-b", absolute, *new_fmt]
        args.append(_with_backing(path, fmt, old, old_backing_fmt))
        self._run(_with_progress(args, progress), timeout=timeout, progress=progress, cancel=cancel)
        if absolute != new:
            args = [self.qemu_img, "rebase", *_format_flag("-f", fmt), "-u", "-b", new, *new_fmt]
            self._run([*args, path], timeout=self.timeout, cancel=cancel)

    def commit(
        self,
        path: str,
        *,
        base: str | None = None,
        fmt: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> None:
        """Write ``path``'s data down into its backing file, or into ``base`` deeper in the chain.

        ``base`` is named as the chain names it (absolute, or relative to ``path``'s directory).
        """
        args = [self.qemu_img, "commit", *_format_flag("-f", fmt)]
        if base is not None:
            args += ["-b", base]
        args.append(_existing(path))
        self._run(_with_progress(args, progress), timeout=timeout, progress=progress)

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
        args = [self.qemu_img, "compare", "-q", *_format_flag("-f", a_fmt)]
        args += _format_flag("-F", b_fmt)
        if strict:
            args.append("-s")
        code = self._run([*args, _existing(a), _existing(b)], timeout=timeout, ok=(0, 1))[0]
        return code == 0

    def check(self, path: str, *, fmt: str | None = None) -> CheckResult:
        """``qemu-img check``: corruptions and leaks are a result, not an exception."""
        args = [self.qemu_img, "check", "--output=json", *_format_flag("-f", fmt), _existing(path)]
        code, out, _ = self._run(args, timeout=self.timeout, ok=(0, 2, 3, _NOT_SUPPORTED))
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
        args = [self.qemu_img, "map", "--output=json", "-U", *_format_flag("-f", fmt)]
        extents: list[dict[str, Any]] = json.loads(
            self._run([*args, _existing(path)], timeout=self.timeout)[1]
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
        options = _options(out_fmt, preallocation)
        if options:
            args += ["-o", ",".join(options)]
        if (path is None) == (size is None):
            raise InvalidParameter("give exactly one of path and size", name="measure")
        if path is not None:
            args += [*_format_flag("-f", fmt), _existing(path)]
        else:
            args += ["--size", str(_size(size))]
        result = json.loads(self._run(args, timeout=self.timeout)[1])
        return Measurement(result["required"], result["fully-allocated"])

    def resize(
        self, path: str, size: int, *, fmt: str, cancel: threading.Event | None = None
    ) -> None:
        """Grow the image to ``size`` bytes; shrinking would destroy data and is refused."""
        current = self.info(path, fmt=fmt)["virtual-size"]
        if _size(size) < current:
            raise InvalidParameter(
                f"{size} is smaller than the image's {current} bytes", name="size"
            )
        if size > current:
            args = [self.qemu_img, "resize", "-q", "-f", fmt, _existing(path), str(size)]
            self._run(args, timeout=self.timeout, cancel=cancel)

    # --- qemu-io, for tests and the demo --------------------------------------------------

    def write_pattern(self, path: str, fmt: str, offset: int, length: int, pattern: int) -> None:
        """Fill ``length`` bytes at ``offset`` with the byte ``pattern``, as a guest would."""
        command = f"write -P {_byte(pattern)} {_offset(offset)} {_size(length)}"
        args = [self.qemu_io, "-f", check_image_format(fmt), "-c", command, _existing(path)]
        self._run(args, timeout=self.timeout)

    def read_pattern_matches(
        self, path: str, fmt: str, offset: int, length: int, pattern: int
    ) -> bool:
        """Whether every byte of the range reads as ``pattern``."""
        command = f"read -P {_byte(pattern)} {_offset(offset)} {_size(length)}"
        fmt = check_image_format(fmt)
        args = [self.qemu_io, "-r", "-U", "-f", fmt, "-c", command, _existing(path)]
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


def _with_progress(args: list[str], progress: Progress | None) -> list[str]:
    return [*args[:2], "-p", *args[2:]] if progress is not None else args


def _format_flag(flag: str, fmt: str | None) -> list[str]:
    return [] if fmt is None else [flag, check_image_format(fmt)]


def check_image_format(fmt: object) -> str:
    """``fmt`` if it is an image format Strata writes, else :class:`InvalidParameter`."""
    if not isinstance(fmt, str) or fmt not in IMAGE_FORMATS:
        raise InvalidParameter(f"one of {', '.join(IMAGE_FORMATS)}, not {fmt!r}", name="format")
    return fmt


def _options(fmt: str, preallocation: str | None) -> list[str]:
    if preallocation is None:
        return []
    if preallocation not in PREALLOCATION[fmt]:
        raise InvalidParameter(
            f"one of {', '.join(PREALLOCATION[fmt])} for {fmt}, not {preallocation!r}",
            name="preallocation",
        )
    return [f"preallocation={preallocation}"]


def _file(path: object) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidParameter(f"a file path, not {path!r}", name="path")
    return os.path.abspath(path)


def _existing(path: object) -> str:
    path = _file(path)
    if not os.path.exists(path):
        raise VolumeFileNotFound(path=path)
    return path


def _backing(image: str, backing: object, backing_fmt: object) -> str:
    """Check a backing reference as it will be written into ``image``'s header."""
    check_image_format(backing_fmt)
    if not isinstance(backing, str) or not backing or "\0" in backing:
        raise InvalidParameter(f"a file path, not {backing!r}", name="backing")
    if re.match(r"[^/]*:", backing):
        raise InvalidParameter(f"{backing!r} would read as a QEMU protocol", name="backing")
    if not os.path.exists(os.path.join(os.path.dirname(image), backing)):
        raise VolumeFileNotFound(path=os.path.join(os.path.dirname(image), backing))
    return backing


def _unsafe(safe: bool) -> list[str]:
    return [] if safe else ["-u"]


def _with_backing(path: str, fmt: str | None, backing: str, backing_fmt: str | None) -> str:
    """``path`` as ``--image-opts``, opened over ``backing`` rather than its header's."""
    if fmt is None:
        raise InvalidParameter("the format of an image opened over another backing", name="fmt")
    options = {
        "driver": check_image_format(fmt),
        "file.driver": "file",
        "file.filename": path,
        "backing.driver": check_image_format(backing_fmt),
        "backing.file.driver": "file",
        "backing.file.filename": os.path.join(os.path.dirname(path), backing),
    }
    return ",".join(f"{key}={value.replace(',', ',,')}" for key, value in options.items())


def _size(size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise InvalidParameter(f"a positive number of bytes, not {size!r}", name="size")
    return size


def _offset(offset: object) -> int:
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidParameter(f"a byte offset of 0 or more, not {offset!r}", name="offset")
    return offset


def _byte(pattern: object) -> int:
    if not isinstance(pattern, int) or isinstance(pattern, bool) or not 0 <= pattern <= 255:
        raise InvalidParameter(f"a byte value 0..255, not {pattern!r}", name="pattern")
    return pattern


def _power_of_two(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and low <= value <= high and value & (value - 1) == 0
