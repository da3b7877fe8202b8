"""A real engine run for the strata-log tests, in a process of its own; prints JSON.

Usage: ``python story.py <empty directory>``. Makes ``<dir>/repo`` and runs the engine
(executors, qemu-img, 1 MiB images) through disks, a snapshot and a clone, a held disk,
removal, resize, merge and clean fixes; then a host that is killed right after claiming a
stage (dead_host.py), and an auditor that reports the state it left. At each quiet moment it
writes down what the facade reported and the log position that belongs to. Run with
``STRATA_SEGMENT_SIZE=4096`` so that the log rolls over into several segments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from engine import StorageEngine

MiB = 2**20
REPO = "r1"
DEAD_HOST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dead_host.py")


def point(se: StorageEngine, name: str) -> dict[str, Any]:
    """The facade's answers at a moment when no work runs, and the log position they hold at."""
    for _ in range(50):
        before = se.describe_repository(REPO)["log_position"]
        images = {}
        for info in se.list_images(REPO):
            status = se.get_image_status(REPO, info.image_id).to_dict()
            images[info.image_id] = {**info.to_dict(), **status}
        fixes = [
            {"type": f.type, "image_ids": list(f.image_ids), "data": f.data}
            for f in se.check_storage_repository(REPO)
        ]
        time.sleep(0.2)
        if se.describe_repository(REPO)["log_position"] == before:
            return {"name": name, "position": before, "images": images, "fixes": fixes}
    raise RuntimeError(f"the log kept moving at {name!r}")


def settle(se: StorageEngine) -> None:
    for info in se.list_images(REPO):
        se.wait_for_image(REPO, info.image_id, timeout=60)
    time.sleep(0.3)


def run_fixes(se: StorageEngine, kind: str) -> None:
    for _ in range(10):
        fixes = [f for f in se.check_storage_repository(REPO) if f.type == kind]
        if not fixes:
            return
        for fix in fixes:
            se.fix_storage_repository(REPO, fix)
        settle(se)
    raise RuntimeError(f"{kind} fixes kept coming")


def main(root: str) -> None:
    repo = os.path.join(root, "repo")
    os.mkdir(repo)
    params = {"path": repo}
    ids: dict[str, str] = {}
    points = []
    engine = StorageEngine(
        "host-a", state_dir=os.path.join(root, "a"), poll_interval=0.1, lease_timeout=1.0
    )
    with engine as se:
        se.create_storage_repository("localfs-1.0", params)
        se.connect_storage_repository(REPO, "localfs-1.0", params)
        ids["web"] = se.create_virtual_disk(REPO, MiB, user_data={"name": "web01"})
        settle(se)
        points.append(point(se, "web made"))
        ids["snap"] = se.create_snapshot(REPO, ids["web"], user_data={"label": "nightly"})
        ids["clone"] = se.create_virtual_disk(REPO, MiB, base_snapshot_id=ids["snap"])
        ids["held"] = se.create_virtual_disk(REPO, MiB, options={"auto_fix": False})
        settle(se)
        se.set_user_data(REPO, ids["clone"], {"name": "clone01"})
        points.append(point(se, "snapshot, clone and a held disk"))
        se.remove_image(REPO, ids["snap"])
        se.resize_virtual_disk(REPO, ids["web"], 2 * MiB)
        settle(se)
        points.append(point(se, "snapshot removed, web resized"))
        run_fixes(se, "merge")
        run_fixes(se, "clean")
        points.append(point(se, "merged and cleaned"))
    dead = subprocess.Popen(
        [sys.executable, DEAD_HOST, repo, os.path.join(root, "dead")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert dead.stdout is not None
    ids["victim"] = dead.stdout.readline().strip()
    if dead.wait(timeout=60) != -signal.SIGKILL:
        raise RuntimeError(f"the dead host exited with {dead.returncode}, not by SIGKILL")
    with StorageEngine(
        "auditor", state_dir=os.path.join(root, "auditor"), run_executors=False
    ) as se:
        se.connect_storage_repository(REPO, "localfs-1.0", params)
        points.append(point(se, "a host died holding a claim"))
    time.sleep(1.5)  # the dead host's heartbeat is older than its 1 s lease from now on
    print(json.dumps({"repo": repo, "ids": ids, "points": points}))


if __name__ == "__main__":
    main(sys.argv[1])
