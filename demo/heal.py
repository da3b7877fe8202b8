"""Chapter 9 of the demo: self-healing data (issue 16, docs/adr/0031 to 0034).

A host of its own, ``host-h``, on two repositories of its own (``h1`` and ``h2``), its copies
throttled (as a slow link would be) so that one can be stopped in the middle: a snapshot and the
digest its log records; its copy in h2, same id, same digest; a copy stopped halfway and resumed
from its last checkpoint; a byte of the snapshot's data flipped in h1, the deep check finding
it, and the mend from the replica in h2, byte-identical afterwards (``qemu-img compare``).

Imports: the engine's facade (``engine``), its errors (``engine.errors``), its QEMU adapter
(:mod:`engine.formats`, to find the data in a volume and compare volumes), ``log_tools`` (what
``strata-log history`` shows) and the demo's story.
"""

from __future__ import annotations

import os
import time
from typing import Any

from demo.story import MiB, Story, say
from engine import StorageEngine
from engine.errors import StrataError
from engine.formats.qemu.image_tools import QemuImg
from log_tools.history import history

SIZE = 64 * MiB
COPY_RATE = 48 * MiB  # bytes a copy reads a second on this host: a slow link


class HealChapter:
    def __init__(self, qemu: QemuImg, scratch: str) -> None:
        self.qemu, self.scratch = qemu, scratch
        self.roots = {name: os.path.join(scratch, name) for name in ("h1", "h2")}

    def run(self) -> dict[str, bool]:
        say("\n9. Self-healing data: digests, a resumed copy, rot found and mended")
        for path in self.roots.values():
            os.mkdir(path)
        slow = QemuImg(copy_rate=COPY_RATE)
        state = os.path.join(self.scratch, "state-h")
        with StorageEngine("host-h", state_dir=state, poll_interval=0.1, qemu=slow) as se:
            for name, path in self.roots.items():
                se.create_storage_repository("localfs-1.0", {"path": path})
                se.connect_storage_repository(name, "localfs-1.0", {"path": path})
            say(f"  host-h, its copies read at most {COPY_RATE // MiB} MiB/s, on h1 and h2")
            story = Story(se, self.qemu)
            checks = self.digests(se, story)
            checks |= self.resumed_copy(se, story)
            checks |= self.rot_mended(se, story)
        return checks

    # --- a snapshot's digest, and its copy's ------------------------------------------------

    def digests(self, se: StorageEngine, story: Story) -> dict[str, bool]:
        say("  a. A snapshot, and the digest of its content in the log")
        self.disk = story.name(se.create_virtual_disk("h1", SIZE), "ledger")
        story.done("h1", self.disk)
        story.write("h1", self.disk, 0, 8 * MiB, 0xD1)
        story.write("h1", self.disk, 40 * MiB, 16 * MiB, 0xD2)
        self.snap = story.name(se.create_snapshot("h1", self.disk), "ledger@1")
        story.done("h1", self.snap)
        here = self.digest_in("h1", self.snap)
        say(f"    strata-log history: VolumeDigested, digest {short(here)}")
        say("  b. Copied to h2: a snapshot's copy keeps its id, and records its own digest")
        copy = se.copy_image("h2", self.snap)
        story.done("h2", copy)
        there = self.digest_in("h2", copy)
        say(f"    in h2 under {'the same' if copy == self.snap else 'another'} id: {short(there)}")
        return {
            "a snapshot's digest is in its log": here is not None,
            "its copy in h2 has the same id and the same digest": copy == self.snap
            and there is not None
            and there == here,
        }

    # --- a copy stopped halfway, resumed --------------------------------------------------

    def resumed_copy(self, se: StorageEngine, story: Story) -> dict[str, bool]:
        say("  c. A copy of ledger to h2, stopped halfway, then resumed by a mend")
        copy = story.name(se.copy_image("h2", self.disk), "ledger-copy")
        deadline = time.monotonic() + 30
        while (status := se.get_image_status("h2", copy)).percent_complete < 40:
            if status.status != "broken" or time.monotonic() > deadline:
                break  # done (or stuck): nothing to stop any more
            time.sleep(0.02)
        try:
            se.stop_fix("h2", copy, reason="the operator stops the copy")
        except StrataError as e:  # it ended first: nothing to resume
            say(f"    the copy ended before the stop: {e}")
        status = se.get_image_status("h2", copy)
        say(f"    stopped at {status.percent_complete}%: {status.status}, {status.last_error}")
        mends = [f for f in se.check_storage_repository("h2") if f.type == "mend"]
        for fix in mends:
            say(f"    check offers {fix.type}: {fix.description}")
            se.fix_storage_repository("h2", fix)
        story.done("h2", copy)
        points = self.checkpoints("h2", copy)
        epochs = sorted({p["epoch"] for p in points})
        if len(epochs) > 1:
            first = [p for p in points if p["epoch"] == epochs[0]]
            again = [p for p in points if p["epoch"] == epochs[-1]]
            say(
                f"    {len(points)} checkpoints in the log; the first attempt wrote "
                f"{first[-1]['written'] / MiB:.1f} MiB up to {first[-1]['offset'] // MiB} MiB, "
                f"the second went on from there and wrote {again[-1]['written'] / MiB:.1f} MiB"
            )
        same = self.same(se, ("h1", self.disk), ("h2", copy))
        say(f"    ledger-copy equals ledger (qemu-img compare): {same}")
        return {
            "a stopped copy resumes from its last checkpoint": len(epochs) > 1
            and min(p["offset"] for p in points if p["epoch"] == epochs[-1]) > 0,
            "the resumed copy is identical": same,
        }

    # --- rot found and mended from the replica --------------------------------------------

    def rot_mended(self, se: StorageEngine, story: Story) -> dict[str, bool]:
        say("  d. A byte of ledger@1's data flips on h1's disk")
        top = se.get_volume_chain("h1", self.snap)[-1]
        offset = flip_a_data_byte(self.qemu, top.path, top.format)
        say(f"    at guest offset {offset} of volume {top.volume_id[:8]}...")
        say("  e. The deep check reads every immutable volume against its digest")
        started = time.monotonic()
        fixes = se.check_storage_repository("h1", {"deep": True})
        took = time.monotonic() - started
        status = se.get_image_status("h1", self.snap)
        say(f"    {took:.2f} s; ledger@1 is {status.status}: {status.last_error}")
        mends = [f for f in fixes if f.type == "mend" and self.snap in f.image_ids]
        for fix in mends:
            say(f"    check offers {fix.type}: {fix.description}")
        say("  f. The mend copies the rotten data again from the replica in h2")
        for fix in mends:
            se.fix_storage_repository("h1", fix)
        story.done("h1", self.snap)
        same = self.same(se, ("h1", self.snap), ("h2", self.snap))
        say(f"    ledger@1 in h1 and h2 byte-identical (qemu-img compare): {same}")
        again = se.check_storage_repository("h1", {"deep": True})
        say(f"    a deep check again offers {len(again)} fixes")
        return {
            "the deep check finds the flipped byte": status.status == "broken" and bool(mends),
            "the mend from the replica makes it byte-identical": same,
            "nothing is left to fix": again == [],
        }

    # --- helpers --------------------------------------------------------------------------

    def events(self, repo: str, image: str, name: str) -> list[dict[str, Any]]:
        log_dir = os.path.join(self.roots[repo], "log")
        return [e["fields"] for e in history(log_dir, image) if e["event"] == name]

    def digest_in(self, repo: str, image: str) -> str | None:
        found = self.events(repo, image, "VolumeDigested")
        return str(found[-1]["digest"]) if found else None

    def checkpoints(self, repo: str, image: str) -> list[dict[str, Any]]:
        return self.events(repo, image, "StageCheckpointed")

    def same(self, se: StorageEngine, a: tuple[str, str], b: tuple[str, str]) -> bool:
        """Whether two images read the same (their top volumes, through their chains)."""
        top_a, top_b = se.get_volume_chain(*a)[-1], se.get_volume_chain(*b)[-1]
        return self.qemu.compare(top_a.path, top_b.path, a_fmt=top_a.format, b_fmt=top_b.format)


def short(digest: str | None) -> str:
    return "none" if digest is None else f"{digest[:16]}..."


def flip_a_data_byte(qemu: QemuImg, path: str, fmt: str) -> int:
    """Flip one byte the volume itself holds (a bad disk would); return its guest offset."""
    extent = next(e for e in qemu.map(path, fmt=fmt) if e["data"] and e["depth"] == 0)
    at: int = extent["length"] // 2 + 11  # inside the first data the volume holds
    host = extent["offset"] + at
    with open(path, "r+b") as f:
        f.seek(host)
        byte = f.read(1)
        f.seek(host)
        f.write(bytes([byte[0] ^ 0x5A]))
    return int(extent["start"]) + int(at)
