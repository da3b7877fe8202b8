"""The demo's voice and its helpers: :func:`say` prints a line, :class:`Story` names images,
waits for them and plays a virtual machine on detached ones (qemu-io on the prepared volume).

Imports: the engine's facade (``engine``) and its QEMU adapter (:mod:`engine.formats`).
"""

from __future__ import annotations

import time

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg

MiB = 2**20


def say(line: str = "") -> None:
    print(line, flush=True)


class Story:
    def __init__(self, se: StorageEngine, qemu: QemuImg) -> None:
        self.se, self.qemu = se, qemu
        self.names: dict[str, str] = {}

    def name(self, image: str, label: str) -> str:
        self.names[image] = label
        return image

    def done(self, repo: str, image: str) -> None:
        started = time.monotonic()
        status = self.se.wait_for_image(repo, image, timeout=120)
        say(
            f"    {self.names.get(image, image)} in {repo}: {status.status}, stage "
            f"{status.stage}, by {status.host_id} ({time.monotonic() - started:.2f} s after)"
        )

    def write(self, repo: str, image: str, offset: int, length: int, pattern: int) -> None:
        prepared = self.se.prepare_image(repo, image)
        try:
            self.qemu.write_pattern(prepared.path, prepared.format, offset, length, pattern)
        finally:
            self.se.teardown_image(repo, image)
        say(f"    the VM wrote {length // MiB} MiB of 0x{pattern:02x} at {offset // MiB} MiB")

    def holds(self, repo: str, image: str, offset: int, length: int, pattern: int) -> bool:
        prepared = self.se.prepare_image(repo, image)
        try:
            return self.qemu.read_pattern_matches(
                prepared.path, prepared.format, offset, length, pattern
            )
        finally:
            self.se.teardown_image(repo, image)
