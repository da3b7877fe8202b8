"""The arguments of QEMU's image tools, checked: what image_tools.py passes to them.

Each function refuses a bad value with :class:`InvalidParameter` (or a missing file with
:class:`VolumeFileNotFound`) before anything runs, and returns it in the form the command line
wants: absolute paths, never a name that could read as an option or a QEMU protocol.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import os
import re

from engine.errors import InvalidParameter, VolumeFileNotFound
from engine.formats.qemu.process import Progress

IMAGE_FORMATS = ("raw", "qcow2")
PREALLOCATION = {"raw": ("off", "falloc", "full"), "qcow2": ("off", "metadata", "falloc", "full")}


def with_progress(args: list[str], progress: Progress | None) -> list[str]:
    return [*args[:2], "-p", *args[2:]] if progress is not None else args


def format_flag(flag: str, fmt: str | None) -> list[str]:
    return [] if fmt is None else [flag, check_image_format(fmt)]


def check_image_format(fmt: object) -> str:
    """``fmt`` if it is an image format Strata writes, else :class:`InvalidParameter`."""
    if not isinstance(fmt, str) or fmt not in IMAGE_FORMATS:
        raise InvalidParameter(f"one of {', '.join(IMAGE_FORMATS)}, not {fmt!r}", name="format")
    return fmt


def options(fmt: str, preallocation: str | None) -> list[str]:
    if preallocation is None:
        return []
    if preallocation not in PREALLOCATION[fmt]:
        raise InvalidParameter(
            f"one of {', '.join(PREALLOCATION[fmt])} for {fmt}, not {preallocation!r}",
            name="preallocation",
        )
    return [f"preallocation={preallocation}"]


def file(path: object) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidParameter(f"a file path, not {path!r}", name="path")
    return os.path.abspath(path)


def existing(path: object) -> str:
    path = file(path)
    if not os.path.exists(path):
        raise VolumeFileNotFound(path=path)
    return path


def backing(image: str, backing: object, backing_fmt: object) -> str:
    """Check a backing reference as it will be written into ``image``'s header."""
    check_image_format(backing_fmt)
    if not isinstance(backing, str) or not backing or "\0" in backing:
        raise InvalidParameter(f"a file path, not {backing!r}", name="backing")
    if re.match(r"[^/]*:", backing):
        raise InvalidParameter(f"{backing!r} would read as a QEMU protocol", name="backing")
    if not os.path.exists(os.path.join(os.path.dirname(image), backing)):
        raise VolumeFileNotFound(path=os.path.join(os.path.dirname(image), backing))
    return backing


def unsafe(safe: bool) -> list[str]:
    return [] if safe else ["-u"]


def with_backing(path: str, fmt: str | None, backing: str, backing_fmt: str | None) -> str:
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


def size(size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise InvalidParameter(f"a positive number of bytes, not {size!r}", name="size")
    return size


def offset(offset: object) -> int:
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidParameter(f"a byte offset of 0 or more, not {offset!r}", name="offset")
    return offset


def byte(pattern: object) -> int:
    if not isinstance(pattern, int) or isinstance(pattern, bool) or not 0 <= pattern <= 255:
        raise InvalidParameter(f"a byte value 0..255, not {pattern!r}", name="pattern")
    return pattern


def power_of_two(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and low <= value <= high and value & (value - 1) == 0
