"""Make a golden log: a real engine run over one repository, and what the engine reported.

    .venv/bin/python tests/replay/make_golden.py tests/replay/golden/<name>

Runs the engine (real executors, real qemu-img, small images) through a story that leaves
every event kind of the current format in the log, and at a few quiet moments writes down what
the facade reported: each live image's status and info, which images were removed, the fixes a
check offered, and the log position (and time) those answers belong to. The output directory
gets ``log/`` (the segment files only) and ``expected.json``. See README.md for when to run it.
The volumes are thrown away: a golden log must replay from the log alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

from engine import StorageEngine
from engine.log import VERSION as LOG_FORMAT_VERSION
from engine.log.reader import ReadOnlyLog

MiB = 2**20
REPO = "r1"
FORMAT = "localfs-1.0"
MAX_BYTES = 100_000


class Story:
    """The run, and what the engine said at each point."""

    def __init__(self, path: str, state_dir: str) -> None:
        self.path = path
        self.state_dir = state_dir
        self.removed: list[str] = []
        self.points: list[dict[str, Any]] = []

    def engine(self, host_id: str, *, executors: bool) -> StorageEngine:
        se = StorageEngine(
            host_id,
            state_dir=os.path.join(self.state_dir, host_id),
            run_executors=executors,
            poll_interval=0.1,
        )
        se.connect_storage_repository(REPO, FORMAT, {"path": self.path})
        return se

    def point(self, se: StorageEngine, name: str) -> None:
        """Write down the engine's answers at a moment when no work runs."""
        for _ in range(50):
            before = se.describe_repository(REPO)["log_position"]
            images = {
                info.image_id: {
                    **{k: v for k, v in info.to_dict().items() if k not in ("image_id", "repo_id")},
                    **{
                        k: v
                        for k, v in se.get_image_status(REPO, info.image_id).to_dict().items()
                        if k != "image_id"
                    },
                }
                for info in se.list_images(REPO)
            }
            fixes = [
                {"type": f.type, "image_ids": list(f.image_ids), "data": f.data}
                for f in se.check_storage_repository(REPO)
            ]
            time.sleep(0.3)
            if se.describe_repository(REPO)["log_position"] == before:
                break
        else:
            raise RuntimeError(f"the log kept moving at point {name!r}")
        self.points.append(
            {
                "name": name,
                "position": before,
                "images": dict(sorted(images.items())),
                "removed": sorted(self.removed),
                "fixes": fixes,
            }
        )

    def remove(self, se: StorageEngine, image_id: str) -> None:
        se.remove_image(REPO, image_id)
        self.removed.append(image_id)


def run_fixes(se: StorageEngine, kind: str, *, only: str | None = None) -> None:
    for _ in range(10):
        fixes = [
            f
            for f in se.check_storage_repository(REPO)
            if f.type == kind and (only is None or only in f.image_ids)
        ]
        if not fixes:
            return
        for fix in fixes:
            se.fix_storage_repository(REPO, fix)
        settle(se)
    raise RuntimeError(f"{kind} fixes kept coming")


def settle(se: StorageEngine) -> None:
    for info in se.list_images(REPO):
        se.wait_for_image(REPO, info.image_id, timeout=60)
    time.sleep(0.5)  # carriers of clean fixes are removed images: nobody waits for them


def tell(story: Story) -> None:
    # host-b only appends (no executors): its work stays pending, held or stopped.
    with story.engine("host-b", executors=False) as se:
        web = se.create_virtual_disk(REPO, MiB, user_data={"name": "web01"})
        fast = se.create_virtual_disk(
            REPO, 2 * MiB, options={"strategy": "performance", "auto_fix": False}
        )
        stopped = se.create_virtual_disk(REPO, MiB, user_data={"name": "stopped"})
        se.stop_fix(REPO, stopped, reason="host overloaded")
        story.point(se, "requested, nothing run yet")
    with story.engine("host-a", executors=True) as se:
        settle(se)
        snap = se.create_snapshot(REPO, web, user_data={"label": "before upgrade"})
        clone = se.create_virtual_disk(REPO, MiB, base_snapshot_id=snap)
        # Held: its mend runs the overlay, then its optimize waits for a fix (degraded).
        perf = se.create_virtual_disk(
            REPO, MiB, base_snapshot_id=snap, options={"strategy": "performance", "auto_fix": False}
        )
        settle(se)
        run_fixes(se, "mend", only=perf)
        se.set_user_data(REPO, clone, {"name": "clone01", "tags": ["a", "b"]})
        story.point(se, "snapshot and clones made, one held for an optimize")
        story.remove(se, snap)
        se.resize_virtual_disk(REPO, web, 2 * MiB)
        settle(se)
        story.point(se, "snapshot removed, disk resized")
        run_fixes(se, "mend", only=fast)
        run_fixes(se, "optimize")
        run_fixes(se, "merge")
        run_fixes(se, "clean")
        story.point(se, "mended, optimized, merged and cleaned")
        prepared = se.prepare_image(REPO, web)
        se.teardown_image(REPO, prepared.image_id)
        story.remove(se, clone)
        settle(se)
        story.point(se, "clone removed")


def times_of(log_dir: str, positions: list[int]) -> dict[int, int]:
    wanted = set(positions)
    return {r.seq: r.time_ns for r in ReadOnlyLog(log_dir).records() if r.seq in wanted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="a new directory, e.g. tests/replay/golden/v1-images")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; a golden log is never remade, only added")
    work = tempfile.mkdtemp(prefix="strata-golden-")
    try:
        repo = os.path.join(work, "repo")
        os.mkdir(repo)
        with StorageEngine("host-b", state_dir=os.path.join(work, "init")) as se:
            se.create_storage_repository(FORMAT, {"path": repo})
        story = Story(repo, os.path.join(work, "state"))
        tell(story)
        log_dir = os.path.join(repo, "log")
        times = times_of(log_dir, [p["position"] for p in story.points])
        for point in story.points:
            point["time_ns"] = times[point["position"]]
        os.makedirs(os.path.join(args.out, "log"))
        for name in sorted(os.listdir(log_dir)):
            if name.startswith("segment-"):
                shutil.copy2(os.path.join(log_dir, name), os.path.join(args.out, "log", name))
        expected = {
            "repository_format": FORMAT,
            "log_format_version": LOG_FORMAT_VERSION,
            "made_by": "tests/replay/make_golden.py",
            "strata_version": metadata.version("strata"),
            "made_on": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "points": story.points,
        }
        with open(os.path.join(args.out, "expected.json"), "w") as f:
            json.dump(expected, f, indent=2, sort_keys=True)
            f.write("\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(
        os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(args.out) for n in names
    )
    print(f"{args.out}: {size} bytes, {len(story.points)} points")
    if size > MAX_BYTES:
        print(f"warning: more than {MAX_BYTES} bytes; tell a shorter story", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
