"""A Strata host in a process of its own, for tests that kill, stop and resume whole hosts.

Usage: ``python host_process.py '<json spec>'``. The spec names the host and its repositories
and lists steps; the host runs them in order and prints one JSON line per event on stdout:

``{"ready": true}``                         connected to every repository
``{"saved": name, "value": ...}``           a step's result, kept as ``$name`` for later steps
``{"holding": true}``                       the steps are done; the host runs until stdin closes
``{"report": {...}}``                       after a ``report`` line on stdin: its projections

Steps: ``{"call": method, "args": [...], "kwargs": {...}, "save": name}`` calls the facade
(``"$name"`` in args stands for a saved value); ``{"fix": type, "repo": r}`` runs every fix of
that type the check offers; ``{"workload": {...}}`` runs :func:`workload`; ``{"settle": true}``
waits until no work will run in its repositories, whoever runs it.

``STRATA_CRASH_AT`` arms a crash point: the test-only switch of engine/executors/crashpoints.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from typing import Any

# Run as a file, it imports the suite's helpers (tests.*) from the project root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine import StorageEngine
from engine.errors import StrataError
from engine.executors.crashpoints import CrashPoints
from engine.formats.qemu.image_tools import QemuImg
from tests.hosts.hostlib import settle

MiB = 2**20


def say(**message: Any) -> None:
    print(json.dumps(message), flush=True)


def slow_qemu(directory: str, rate: str) -> QemuImg:
    """The real qemu-img with copies and rebases throttled to ``rate`` bytes a second, so
    that a few MiB take long enough to kill or stop the host in the middle. One coroutine
    (``-m 1``): with several, qemu-img reports 100% at once and spends the time after it."""
    script = os.path.join(directory, "slow-qemu-img")
    real = shutil.which("qemu-img")
    with open(script, "w") as f:
        f.write(
            "#!/bin/sh\n"
            f'if [ "$1" = convert ]; then shift; exec {real} convert -m 1 -r {rate} "$@"; fi\n'
            f'exec {real} "$@"\n'
        )
    os.chmod(script, 0o755)
    # Checkpointed copies (docs/adr/0032) read through qemu-nbd: throttled by copy_rate.
    return QemuImg(qemu_img=script, copy_rate=int(rate.rstrip("M")) * MiB)


def resolve(value: Any, saved: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return saved[value[1:]]
    if isinstance(value, list):
        return [resolve(v, saved) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, saved) for k, v in value.items()}
    return value


def run_fixes(engine: StorageEngine, repo: str, fix_type: str) -> int:
    started = 0
    for fix in engine.check_storage_repository(repo):
        if fix.type == fix_type:
            engine.fix_storage_repository(repo, fix)
            started += 1
    return started


def workload(engine: StorageEngine, host: str, seed: int, rounds: int) -> dict[str, Any]:
    """Create, snapshot, copy and remove this host's own images in both repositories, while
    the other hosts do the same: every host's executors claim whatever stage comes first.

    Returns what was asked: for each image id and repository, "live" or "removed".
    """
    rng = random.Random(seed)
    asked: dict[str, str] = {}  # "<repo>/<image id>" -> "live" | "removed"
    disks: list[tuple[str, str]] = []
    snapshots: list[tuple[str, str]] = []
    for n in range(rounds):
        repo = rng.choice(["r1", "r2"])
        strategy = rng.choice(["space", "space", "performance"])
        disk = engine.create_virtual_disk(
            repo, 4 * MiB, user_data={"host": host, "n": n}, options={"strategy": strategy}
        )
        asked[f"{repo}/{disk}"] = "live"
        disks.append((repo, disk))
        snap = engine.create_snapshot(repo, disk)
        asked[f"{repo}/{snap}"] = "live"
        snapshots.append((repo, snap))
        if rng.random() < 0.5:
            clone = engine.create_virtual_disk(repo, 4 * MiB, base_snapshot_id=snap)
            asked[f"{repo}/{clone}"] = "live"
            disks.append((repo, clone))
        other = "r2" if repo == "r1" else "r1"
        copied = engine.copy_image(other, snap)
        asked[f"{other}/{copied}"] = "live"
        if rng.random() < 0.4 and len(disks) > 1:
            gone_repo, gone = disks.pop(rng.randrange(len(disks)))
            # Its volumes first: a disk removed before its create ran voids that create, and a
            # snapshot taken of it meanwhile then waits for a volume nobody makes (reported with
            # this issue; the rule is engine/projections/volume_needs.py's will_run).
            engine.wait_for_image(gone_repo, gone, timeout=120)
            engine.remove_image(gone_repo, gone)
            asked[f"{gone_repo}/{gone}"] = "removed"
    for key, want in asked.items():
        repo, image = key.split("/")
        if want == "live":
            engine.wait_for_image(repo, image, timeout=120)
    return asked


def report(engine: StorageEngine, repos: list[str]) -> dict[str, Any]:
    """What this host's projections say, at the log position they reached."""
    out: dict[str, Any] = {}
    for repo in repos:
        described = engine.describe_repository(repo)
        images = {}
        for info in engine.list_images(repo):
            status = engine.get_image_status(repo, info.image_id)
            images[info.image_id] = {
                "kind": info.kind,
                "depth": info.chain_depth,
                "status": status.status,
                "stage": status.stage,
                "user_data": info.user_data,
            }
        out[repo] = {"position": described["log_position"], "images": images}
    return out


def main(spec: dict[str, Any]) -> None:
    qemu = None
    if spec.get("slow_rate"):
        qemu = slow_qemu(spec["state_dir"], spec["slow_rate"])
    engine = StorageEngine(
        spec["host_id"],
        state_dir=spec["state_dir"],
        lease_timeout=spec.get("lease_timeout", 1.0),
        poll_interval=spec.get("poll_interval", 0.1),
        run_executors=spec.get("run_executors", True),
        qemu=qemu,
        crashpoints=CrashPoints.from_environ(os.environ),
    )
    try:
        for name, path in spec["repos"].items():
            engine.connect_storage_repository(name, "localfs-1.0", {"path": path})
        say(ready=True)
        saved: dict[str, Any] = {}
        for step in spec.get("steps", []):
            if "call" in step:
                method = getattr(engine, step["call"])
                args = resolve(step.get("args", []), saved)
                result = method(*args, **resolve(step.get("kwargs", {}), saved))
                if hasattr(result, "to_dict"):
                    result = result.to_dict()
            elif "fix" in step:
                result = run_fixes(engine, step["repo"], step["fix"])
            elif "settle" in step:
                settle(list(spec["repos"].values()))
                result = True
            elif "workload" in step:
                w = step["workload"]
                result = workload(engine, spec["host_id"], w["seed"], w["rounds"])
            else:
                raise ValueError(f"unknown step {step!r}")
            if "save" in step:
                saved[step["save"]] = result
                say(saved=step["save"], value=result)
        say(holding=True)
        for line in sys.stdin:
            if line.strip() == "report":
                say(report=report(engine, list(spec["repos"])))
    except StrataError as e:
        say(error=e.to_dict())
        raise
    finally:
        engine.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
