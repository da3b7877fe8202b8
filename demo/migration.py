"""The demo's migration chapter: a disk a virtual machine writes to the whole time moves from r1
to r2 in one call (``migrate_image``), keeping its id and its NBD address; then seed 003's
granular verbs move another disk step by step, and a third migration is aborted by finishing it
onto the source (docs/architecture.md §8, docs/adr/0029).

Imports: the engine's facade (``engine``), its errors (``engine.errors``), and its QEMU adapter
(:mod:`engine.formats`, to compare what the VM saw with the volumes).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress

from demo.guest import Guest
from demo.live import tools_missing
from demo.story import MiB, Story, say
from engine import StorageEngine
from engine.errors import ImageNotFound, ReplicationNotReady
from engine.formats.qemu.image_tools import QemuImg

# The stages of migrate_image on an attached disk, in the order its operation runs them.
STEPS = ("live snapshot", "clone", "sync", "mirror", "switch")


class MigrationChapter:
    def __init__(
        self, se: StorageEngine, story: Story, qemu: QemuImg, roots: dict[str, str], scratch: str
    ) -> None:
        self.se, self.story, self.qemu, self.scratch = se, story, qemu, scratch
        self.roots = roots

    def run(self) -> dict[str, bool]:
        """Tell the chapter; returns what it checked (nothing when the daemon is missing)."""
        say("\n7. Live storage migration: a running VM's disk moves from r1 to r2")
        if tools_missing():
            say("    skipped, as chapter 6")
            return {}
        checks = self.one_call()
        checks |= self.step_by_step()
        checks |= self.aborted()
        return checks

    # --- migrate_image -------------------------------------------------------------------------
    def one_call(self) -> dict[str, bool]:
        se, story = self.se, self.story
        disk = self.disk("app01", 32 * MiB)
        uri = se.attach_image("r1", disk).nbd_uri
        say(f"  a. app01 (32 MiB of data) attached at {uri}; the VM writes throughout")
        guest = Guest(uri, start=0, length=16 * MiB)
        try:
            await_writes(guest, guest.count + 200)
            before = guest.count
            op = se.migrate_image("r1", disk, "r2")
            say(f"    migrate_image r1 -> r2: operation {op[:8]}, at write {before}")
            self.follow(disk)
            story.done("r2", disk)
            now = {a.image_id: a for a in se.list_attachments()}.get(disk)
            same_uri = now is not None and now.nbd_uri == uri and now.repo_id == "r2"
            if now is not None:
                address = "the same" if now.nbd_uri == uri else f"another ({now.nbd_uri})"
                say(f"    attached from {now.repo_id} now, at {address} NBD address")
            try:
                se.get_image_status("r1", disk)
                gone = False
            except ImageNotFound as e:
                gone = True
                say(f"    r1 asked about app01: {type(e).__name__}")
            await_writes(guest, guest.count + 200)
        finally:
            guest.stop()
        say(f"    the VM stops after {guest.count} acknowledged writes; error: {guest.error}")
        seen = os.path.join(self.scratch, "app01-as-the-vm-saw-it.raw")
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, seen],
            check=True,
            capture_output=True,
            timeout=60,
        )
        se.detach_image("r2", disk)
        prepared = se.prepare_image("r2", disk)
        try:
            lost = guest.reads_back(prepared.path, prepared.format)
            same = self.qemu.compare(prepared.path, seen, a_fmt=prepared.format, b_fmt="raw")
            kept = self.qemu.read_pattern_matches(
                prepared.path, prepared.format, 16 * MiB, 16 * MiB, 0xC1
            )
        finally:
            se.teardown_image("r2", disk)
        say(f"    detached; {len(guest.acknowledged)} blocks read back from r2, lost: {len(lost)}")
        freed = self.clean("r1")
        return {
            "app01 keeps its NBD address, served from r2": same_uri,
            "r1 no longer knows app01 (ImageNotFound)": gone,
            "the VM saw no error while app01 moved": guest.error is None,
            f"all {len(guest.acknowledged)} blocks the VM last wrote read back from r2": not lost,
            "app01's volumes in r2 equal what the VM last saw": same,
            "app01's data written before the move is in r2": kept,
            f"clean on r1 freed app01's old volumes ({freed / MiB:.0f} MiB)": freed >= 32 * MiB,
        }

    def follow(self, disk: str) -> None:
        """Print the migration's stage in r1 each time it changes, until r1 no longer knows the
        image: switched, it lives in r2."""
        last = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status = self.se.get_image_status("r1", disk)
            except ImageNotFound:
                say("    switched: r1 no longer has app01, r2 serves it")
                return
            done, _, total = status.stage.partition("/")
            step = STEPS[int(done) - 1] if total == str(len(STEPS)) else "?"
            line = f"    r1: {status.status}, stage {status.stage} ({step})"
            if line != last:
                say(line)
                last = line
            time.sleep(0.05)

    # --- seed 003's verbs ----------------------------------------------------------------------
    def step_by_step(self) -> dict[str, bool]:
        se, story = self.se, self.story
        disk = self.disk("app02", 16 * MiB)
        uri = se.attach_image("r1", disk).nbd_uri
        say("  b. app02, attached, moved by seed 003's verbs in its order; the VM writes")
        guest = Guest(uri, start=0, length=8 * MiB)
        tries = 0
        try:
            await_writes(guest, guest.count + 100)
            self.step("create_snapshot (live)", lambda: se.create_snapshot("r1", disk))
            story.done("r1", disk)
            self.step("clone_image_structure", lambda: se.clone_image_structure("r1", disk, "r2"))
            story.done("r1", disk)
            self.step("disk_replicate_start", lambda: se.disk_replicate_start("r1", disk, "r2"))
            self.step(
                "sync_image_data INTERNAL (queued; the copy runs)",
                lambda: se.sync_image_data("r1", disk, "r2", "INTERNAL"),
            )
            not_ready = ""
            while True:
                tries += 1
                try:
                    se.disk_replicate_finish("r1", disk, "r2")
                    break
                except ReplicationNotReady as e:
                    not_ready = f"{type(e).__name__} (VDSM code {e.vdsm_code})"
                    time.sleep(0.1)
            again = f", after {tries - 1} x {not_ready}" if not_ready else ""
            say(f"    disk_replicate_finish: switched at try {tries}{again}")
            story.done("r2", disk)
            await_writes(guest, guest.count + 100)
        finally:
            guest.stop()
        served = {a.image_id: a.repo_id for a in se.list_attachments()}.get(disk)
        lost = guest.reads_back(uri, "raw")
        se.detach_image("r2", disk)
        return {
            "app02 moved to r2 by the granular verbs, served there": served == "r2",
            "the VM saw no error while app02 moved": guest.error is None,
            "every write app02's VM was told was done reads back from r2": not lost,
        }

    def aborted(self) -> dict[str, bool]:
        se = self.se
        disk = self.disk("app03", 16 * MiB)
        uri = se.attach_image("r1", disk).nbd_uri
        say("  c. app03: cloned and mirrored to r2, then finished onto r1: an abort")
        guest = Guest(uri, start=0, length=8 * MiB)
        try:
            await_writes(guest, guest.count + 100)
            se.clone_image_structure("r1", disk, "r2")
            se.wait_for_image("r1", disk, timeout=60)
            se.disk_replicate_start("r1", disk, "r2")
            await_writes(guest, guest.count + 100)
            se.disk_replicate_finish("r1", disk, "r1")
            say("    disk_replicate_finish r1 -> r1: the mirror is cancelled, the replica removed")
            await_writes(guest, guest.count + 100)
        finally:
            guest.stop()
        served = {a.image_id: a.repo_id for a in se.list_attachments()}.get(disk)
        try:
            se.get_image_status("r2", disk)
            replica_gone = False
        except ImageNotFound:
            replica_gone = True
        status = se.get_image_status("r1", disk)
        say(f"    app03 in r1: {status.status}, served from {served}; r2 asked: ImageNotFound")
        lost = guest.reads_back(uri, "raw")
        se.detach_image("r1", disk)
        return {
            "app03 stays in r1 after the abort, its replica gone": served == "r1"
            and replica_gone
            and status.status != "broken",
            "every write app03's VM was told was done reads back from r1": guest.error is None
            and not lost,
        }

    # --- helpers -------------------------------------------------------------------------------
    def disk(self, label: str, data: int) -> str:
        """A 64 MiB disk in r1 holding ``data`` bytes of 0xC1 from 16 MiB on, in its base."""
        disk = self.se.create_virtual_disk("r1", 64 * MiB, user_data={"name": label})
        self.story.name(disk, label)
        self.se.wait_for_image("r1", disk, timeout=60)
        prepared = self.se.prepare_image("r1", disk)
        try:
            self.qemu.write_pattern(prepared.path, prepared.format, 16 * MiB, data, 0xC1)
        finally:
            self.se.teardown_image("r1", disk)
        return disk

    def step(self, name: str, call: Callable[[], object]) -> None:
        started = time.monotonic()
        call()
        say(f"    {name}: returned in {time.monotonic() - started:.2f} s")

    def clean(self, repo: str) -> int:
        """Run what check offers on ``repo`` until it offers nothing; return the bytes freed."""
        before = used_bytes(self.roots[repo])
        for _ in range(6):
            fixes = self.se.check_storage_repository(repo)
            if not fixes:
                break
            for fix in fixes:
                say(f"    check {repo}: {fix.type} - {fix.description}")
                self.se.fix_storage_repository(repo, fix)
                for image in fix.image_ids:
                    with suppress(ImageNotFound):
                        self.se.wait_for_image(repo, image, timeout=60)
            time.sleep(0.3)
        freed = before - used_bytes(self.roots[repo])
        say(f"    {repo} uses {freed / MiB:.0f} MiB less")
        return freed


def used_bytes(root: str) -> int:
    """What the repository's volume files take on disk (its log left out)."""
    total = 0
    for folder, _, files in os.walk(root):
        if os.path.basename(folder) == "log":
            continue
        total += sum(os.lstat(os.path.join(folder, f)).st_blocks * 512 for f in files)
    return total


def await_writes(guest: Guest, count: int) -> None:
    deadline = time.monotonic() + 30
    while guest.count < count and guest.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
