"""Images used through a real engine as a virtual machine would use them: prepared, written,
read back and compared; and the checks around it (a tree's digest, running a check's fixes)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine import PreparedImage, StorageEngine
from engine.errors import ImageNotFound
from engine.formats.qemu.image_tools import QemuImg

MiB = 2**20

# The ``engines`` fixture (tests/conftest.py): ``engines(host_id, directory=None, **kwargs)``.
Engines = Callable[..., StorageEngine]


@contextmanager
def prepared(engine: StorageEngine, repo: str, image: str) -> Iterator[PreparedImage]:
    """The image's path while a virtual machine would have it open."""
    opened = engine.prepare_image(repo, image)
    try:
        yield opened
    finally:
        engine.teardown_image(repo, image)


def write(
    engine: StorageEngine,
    qemu: QemuImg,
    repo: str,
    image: str,
    offset: int,
    length: int,
    pattern: int,
) -> None:
    """Play the virtual machine: write a pattern through the path prepare_image gives."""
    with prepared(engine, repo, image) as p:
        qemu.write_pattern(p.path, p.format, offset, length, pattern)


def holds(
    engine: StorageEngine,
    qemu: QemuImg,
    repo: str,
    image: str,
    offset: int,
    length: int,
    pattern: int,
) -> bool:
    with prepared(engine, repo, image) as p:
        return qemu.read_pattern_matches(p.path, p.format, offset, length, pattern)


def same_content(
    engine: StorageEngine, qemu: QemuImg, a: tuple[str, str], b: tuple[str, str]
) -> bool:
    with prepared(engine, *a) as pa, prepared(engine, *b) as pb:
        return qemu.compare(pa.path, pb.path, a_fmt=pa.format, b_fmt=pb.format)


# Written as time passes, not by calls: a host's heartbeat, renewed every lease_timeout / 4, and
# its witness of what it committed, written at the first refresh after an append (ADR 0018). A
# call that appended would show in the log's segments.
BY_THE_CLOCK = (os.path.join("hosts", ""), os.path.join("log", "witnesses", ""))


def tree_digest(*roots: str) -> str:
    """Every file's path and bytes under the roots: to prove a refused call changed nothing."""
    h = hashlib.sha256()
    for root in roots:
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, root).startswith(BY_THE_CLOCK):
                    continue
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def run_fixes(engine: StorageEngine, repo: str, kind: str) -> int:
    """Run every fix of one kind that a check offers, and wait for the images it touches."""
    fixes = [f for f in engine.check_storage_repository(repo) if f.type == kind]
    for fix in fixes:
        engine.fix_storage_repository(repo, fix)
        for image in fix.image_ids:
            # A removed image carries clean and merge work, unseen by users.
            with contextlib.suppress(ImageNotFound):
                engine.wait_for_image(repo, image, timeout=30)
    return len(fixes)
