"""``python -m demo`` (``make demo``): a day in the life of two repositories.

In a temporary directory: a virtual disk gets data, a snapshot, three clones (thin, fast and in
the other repository), a full copy and an incremental copy to the second repository (the
backup flow); a snapshot is removed; check finds what to merge and clean, and the fixes run.
Then a disk in use by a running VM gets the same work live (:mod:`demo.live`; skipped without
qemu-storage-daemon), disks in use move from r1 to r2 while their VMs write
(:mod:`demo.migration`), the host daemon is driven by the ``strata`` command line
(:mod:`demo.serve`), and data heals itself on a host of its own (:mod:`demo.heal`: digests, a
copy stopped and resumed, a flipped byte found and mended from a replica); the host's storage
daemon is stopped at the end. Every call returns once its events are durable; the executors do
the work. At the end: every image's status, what the volumes hold (checked with qemu-img), and
``strata-log verify``.

A client of the engine, outside it (docs/adr/0025-layers-and-the-import-rule.md).
Imports: the engine's facade (``engine``), its QEMU adapter (:mod:`engine.formats`, to look
into the volumes), and ``log_tools``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from demo.heal import HealChapter
from demo.live import LiveChapter, daemon_stopped_at_the_end
from demo.migration import MigrationChapter
from demo.serve import ServeChapter
from demo.story import MiB, Story, say
from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg, allocated_bytes
from log_tools.verify import verify, write_text


def main() -> int:
    qemu = QemuImg()
    # In /tmp whatever TMPDIR says: the daemon's Unix sockets live under the state dir, and a
    # socket's path is at most 107 bytes (docs/adr/0027).
    with tempfile.TemporaryDirectory(prefix="strata-demo-", dir="/tmp") as work:
        repo1, repo2 = os.path.join(work, "repo1"), os.path.join(work, "repo2")
        for path in (repo1, repo2):
            os.mkdir(path)
        say(f"Two repositories in {work}")
        state_dir = os.path.join(work, "state")
        with (
            daemon_stopped_at_the_end(state_dir),
            StorageEngine("host-a", state_dir=state_dir, poll_interval=0.1) as se,
        ):
            story = Story(se, qemu)
            for name, path in (("r1", repo1), ("r2", repo2)):
                se.create_storage_repository("localfs-1.0", {"path": path})
                se.connect_storage_repository(name, "localfs-1.0", {"path": path})
            say("  formatted and connected as r1 and r2 (localfs-1.0)")

            say("\n1. A virtual disk, and data written by a VM")
            disk = story.name(
                se.create_virtual_disk("r1", 256 * MiB, user_data={"name": "web01"}), "web01"
            )
            story.done("r1", disk)
            story.write("r1", disk, 0, 16 * MiB, 0xA1)

            say("\n2. A snapshot; the disk stays writable")
            gold = story.name(
                se.create_snapshot("r1", disk, user_data={"name": "golden"}), "golden"
            )
            story.done("r1", gold)
            story.done("r1", disk)
            story.write("r1", disk, 16 * MiB, 8 * MiB, 0xA2)

            say("\n3. Three clones of the snapshot")
            thin = story.name(
                se.create_virtual_disk("r1", 256 * MiB, base_snapshot_id=gold), "clone-thin"
            )
            fast = story.name(
                se.create_virtual_disk(
                    "r1", 256 * MiB, base_snapshot_id=gold, options={"strategy": "performance"}
                ),
                "clone-fast",
            )
            away = story.name(
                se.create_virtual_disk("r2", 256 * MiB, base_snapshot_id=gold), "clone-in-r2"
            )
            say(f"    right after the call, clone-fast is {se.get_image_status('r1', fast).status}")
            for repo, image in (("r1", thin), ("r1", fast), ("r2", away)):
                story.done(repo, image)

            say("\n4. A backup to r2, then an incremental one ")
            backup = story.name(se.copy_image("r2", disk), "backup-1")
            story.done("r2", backup)
            story.write("r1", disk, 100 * MiB, 4 * MiB, 0xA3)
            incremental = story.name(se.copy_image("r2", disk, base_image_id=backup), "backup-2")
            story.done("r2", incremental)
            diff = se.prepare_image("r2", incremental)
            se.teardown_image("r2", incremental)
            allocated = allocated_bytes(diff.path) / MiB
            say(f"    backup-2 allocates {allocated:.1f} MiB for the 4 MiB that changed")

            say("\n5. The golden snapshot is removed; check and fix")
            se.remove_image("r1", gold)
            for round_ in range(1, 6):
                fixes = se.check_storage_repository("r1")
                if not fixes:
                    break
                for fix in fixes:
                    say(f"    round {round_}: {fix.type} - {fix.description}")
                    se.fix_storage_repository("r1", fix)
                listed = {i.image_id for i in se.list_images("r1")}
                for image in {i for fix in fixes for i in fix.image_ids} & listed:
                    story.done("r1", image)
                time.sleep(0.3)
            say(f"    check now offers {len(se.check_storage_repository('r1'))} fixes")

            checks = LiveChapter(se, story, qemu, work).run()
            roots = {"r1": repo1, "r2": repo2}
            checks |= MigrationChapter(se, story, qemu, roots, work).run()
            checks |= ServeChapter(roots, work).run()
            checks |= HealChapter(qemu, work).run()

            say("\nFinal statuses")
            for repo in ("r1", "r2"):
                for info in se.list_images(repo):
                    status = se.get_image_status(repo, info.image_id)
                    label = story.names.get(info.image_id, info.image_id[:8])
                    say(
                        f"  {repo} {label:12} {info.kind:12} {status.status:9} "
                        f"stage {status.stage:5} chain depth {info.chain_depth}"
                    )

            checks |= {
                "web01 holds both writes": story.holds("r1", disk, 0, 16 * MiB, 0xA1)
                and story.holds("r1", disk, 16 * MiB, 8 * MiB, 0xA2),
                "clones hold the snapshot's data, merged in": all(
                    story.holds(r, i, 0, 16 * MiB, 0xA1)
                    and not story.holds(r, i, 16 * MiB, MiB, 0xA2)
                    for r, i in (("r1", thin), ("r1", fast), ("r2", away))
                ),
                "backup-2 equals web01": qemu.compare(
                    se.prepare_image("r2", incremental).path,
                    se.prepare_image("r1", disk).path,
                    a_fmt=diff.format,
                    b_fmt=se.prepare_image("r1", disk).format,
                ),
            }
            for repo, image in (("r2", incremental), ("r1", disk)):
                se.teardown_image(repo, image)
            say("\nWhat the volumes hold (qemu-io, qemu-img compare)")
            for what, ok in checks.items():
                say(f"  {'ok  ' if ok else 'FAIL'} {what}")

        say("\nstrata-log verify r1:")
        write_text(verify(os.path.join(repo1, "log")), sys.stdout)
        return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
