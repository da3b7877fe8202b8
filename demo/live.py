"""The demo's live chapter: a disk attached to this host's storage daemon, a virtual machine
writing to it over NBD the whole time, and the work done under it: live snapshots, the merge of
a removed snapshot, a block pull and an active commit, each followed in the job view; then the
disk is detached and every write the VM was told was done is read back from the volume on disk
(docs/architecture.md §8, docs/adr/0028-live-operations-as-stages.md).

Imports: the engine's facade (``engine``), its errors (``engine.errors``), and its QEMU adapter
(:mod:`engine.formats`: the storage daemon, to stop it at the end; qemu-img, to compare what the
VM saw with the volume).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from demo.guest import Guest
from demo.story import MiB, Story, say
from engine import BlockJob, StorageEngine
from engine.errors import ImageNotFound
from engine.formats.qemu.image_tools import QemuImg
from engine.formats.qemu.storage_daemon import StorageDaemon


@contextmanager
def daemon_stopped_at_the_end(state_dir: str) -> Iterator[None]:
    """Stop the state dir's storage daemon on the way out, whatever happened: it outlives an
    engine by design (docs/adr/0027), but the demo's must not outlive the demo."""
    try:
        yield
    finally:
        StorageDaemon(state_dir).stop()


INSTALLED = 0xB0


def tools_missing() -> list[str]:
    return [tool for tool in ("qemu-storage-daemon", "qemu-io") if shutil.which(tool) is None]


class LiveChapter:
    def __init__(self, se: StorageEngine, story: Story, qemu: QemuImg, scratch: str) -> None:
        self.se, self.story, self.qemu, self.scratch = se, story, qemu, scratch
        self.uri = ""

    def run(self) -> dict[str, bool]:
        """Tell the chapter; returns what it checked (nothing when the daemon is missing)."""
        say("\n6. A running VM: live snapshots, merge, pull and commit while it writes")
        missing = tools_missing()
        if missing:
            debian = "Debian: qemu-system-common, qemu-utils"
            say(f"    {' and '.join(missing)} not installed ({debian}): skipped")
            return {}
        se, story = self.se, self.story
        disk = story.name(
            se.create_virtual_disk("r1", 64 * MiB, user_data={"name": "db01"}), "db01"
        )
        story.done("r1", disk)
        attachment = se.attach_image("r1", disk)
        self.uri = attachment.nbd_uri
        say(f"    db01 attached; the VM opens {self.uri}")
        # What the VM installed once: 16 MiB that the writes below never touch, in the base
        # volume, so that the pull has something to copy.
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P {INSTALLED:#04x} 16M 16M", self.uri],
            check=True,
            capture_output=True,
            timeout=60,
        )
        say("    the VM installs 16 MiB at 16 MiB")
        guest = Guest(self.uri, start=0, length=16 * MiB)
        try:
            self.await_writes(guest, 200)
            say(f"    the VM writes 64 KiB blocks over db01's first 16 MiB ({guest.count} so far)")
            checks = self.under_writes(disk, guest)
        finally:
            guest.stop()
        say(f"    the VM stops after {guest.count} acknowledged writes; error: {guest.error}")
        checks["the VM saw no error"] = guest.error is None
        checks[
            "every write it was told was done reads back through the export"
        ] = not guest.reads_back(self.uri, "raw")
        return checks | self.after_detach(disk, guest)

    def under_writes(self, disk: str, guest: Guest) -> dict[str, bool]:
        se, story = self.se, self.story
        say("  a. two live snapshots; the VM's connection follows each switch")
        snapshots = []
        for label in ("before-upgrade", "nightly"):
            before = guest.count
            snap = story.name(se.create_snapshot("r1", disk, user_data={"name": label}), label)
            story.done("r1", snap)
            self.await_writes(guest, guest.count + 100)
            say(f"    {label} taken at write {before}; chain {self.chain(disk)}")
            snapshots.append(snap)

        say("  b. before-upgrade is removed; check offers a merge, run live, then a clean")
        se.remove_image("r1", snapshots[0])
        self.fix_all()
        say(f"    db01's chain is now {self.chain(disk)}, still attached")

        say("  c. a block pull: db01's top volume takes in all it reads from below, 8 MiB/s")
        se.block_pull("r1", disk, bandwidth=8 * MiB)
        pulled = self.follow(disk)
        say(f"    db01's chain is now {self.chain(disk)}; nightly keeps its own volume")

        say("  d. an active commit: a new snapshot, removed, then its top merged into the base")
        se.remove_image("r1", se.create_snapshot("r1", disk))
        chain = se.get_volume_chain("r1", disk)
        shared = [v.volume_id[:8] for v in chain if v.shared]
        say(f"    chain {self.chain(disk)}; shared with another image: {shared or 'none'}")
        se.block_commit("r1", disk, chain[-1].volume_id, chain[0].volume_id)
        committed = self.follow(disk)
        self.fix_all()
        say(f"    db01's chain is now {self.chain(disk)}")
        self.await_writes(guest, guest.count + 100)
        return {
            "db01 pulled and committed while attached": pulled.state
            == committed.state
            == "completed"
            and len(se.get_volume_chain("r1", disk)) == 1,
        }

    def after_detach(self, disk: str, guest: Guest) -> dict[str, bool]:
        se = self.se
        seen = os.path.join(self.scratch, "db01-as-the-vm-saw-it.raw")
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", self.uri, seen],
            check=True,
            capture_output=True,
            timeout=60,
        )
        se.detach_image("r1", disk)
        say(f"  e. detached; {len(se.list_attachments())} images remain attached")
        prepared = se.prepare_image("r1", disk)
        try:
            lost = guest.reads_back(prepared.path, prepared.format)
            installed = self.qemu.read_pattern_matches(
                prepared.path, prepared.format, 16 * MiB, 16 * MiB, INSTALLED
            )
            same = self.qemu.compare(prepared.path, seen, a_fmt=prepared.format, b_fmt="raw")
        finally:
            se.teardown_image("r1", disk)
        blocks = len(guest.acknowledged)
        return {
            f"all {blocks} blocks the VM last wrote read back from db01's volume": not lost,
            "what the VM installed is still there": installed,
            "db01's volume equals what the VM last saw": same,
        }

    # --- helpers -------------------------------------------------------------------------------
    def chain(self, disk: str) -> str:
        return " <- ".join(v.volume_id[:8] for v in self.se.get_volume_chain("r1", disk))

    def follow(self, disk: str) -> BlockJob:
        """Print the job view every half second until the job has ended."""
        deadline = time.monotonic() + 60
        while True:
            job = self.se.get_block_job("r1", disk)
            if job is None:
                raise RuntimeError("the block job vanished")
            limit = f", limit {job.bandwidth / MiB:.0f} MiB/s" if job.bandwidth else ""
            say(
                f"    job {job.job_id[:8]} ({job.kind}): {job.state}, {job.cur / MiB:.1f} of "
                f"{job.end / MiB:.1f} MiB{limit}"
            )
            if job.state in ("completed", "failed", "aborted") or time.monotonic() > deadline:
                self.story.done("r1", disk)
                return job
            time.sleep(0.5)

    def fix_all(self) -> None:
        """Run what check offers, round after round, until it offers nothing."""
        for _ in range(6):
            fixes = self.se.check_storage_repository("r1")
            if not fixes:
                return
            for fix in fixes:
                say(f"    {fix.type}: {fix.description}")
                self.se.fix_storage_repository("r1", fix)
                for image in fix.image_ids:
                    # A removed snapshot's volumes are work of no image a user sees.
                    with suppress(ImageNotFound):
                        self.se.wait_for_image("r1", image, timeout=60)

    @staticmethod
    def await_writes(guest: Guest, count: int) -> None:
        deadline = time.monotonic() + 30
        while guest.count < count and guest.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
