"""How long a stage claimed by a host that died stays orphaned before another host takes it.

    python bench/takeover.py [--dir DIR] [--lease-timeout S] [--poll-interval S] [--rounds N]

Host A (a process of its own) copies a snapshot to the second repository with qemu-img
throttled, and is killed with SIGKILL (its whole process group) once the copy has reported
progress. Host B, already running with the same ``lease_timeout``, counts A dead once A's
heartbeat has been silent for that long and claims the stage again. Prints ``name: value`` lines:

* ``lease_timeout`` and ``poll_interval``: the settings of both hosts;
* ``takeover_seconds``: from the kill to B's ``StageClaimed`` (the record's own timestamp),
  median over the rounds, and its maximum;
* ``takeover_seconds_over_lease_timeout``: the same minus ``lease_timeout`` (target <= 2): what
  the engine adds to the wait that the lease itself imposes. It can be below zero: A's last
  renewal came up to ``lease_timeout / 4`` before the kill, and B counts from when it saw it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _about import interpreter

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg
from engine.log import OperationLog

MiB = 2**20


def host_a(spec: dict[str, str | float]) -> None:
    """The host to kill: start a slow copy, say which image, then wait to die."""
    script = os.path.join(str(spec["work"]), "slow-qemu-img")
    real = shutil.which("qemu-img")
    with open(script, "w") as f:
        f.write(
            "#!/bin/sh\n"
            f'if [ "$1" = convert ]; then shift; exec {real} convert -m 1 -r 1M "$@"; fi\n'
            f'exec {real} "$@"\n'
        )
    os.chmod(script, 0o755)
    se = StorageEngine(
        "host-a",
        state_dir=os.path.join(str(spec["work"]), "state-a"),
        lease_timeout=float(spec["lease_timeout"]),
        poll_interval=float(spec["poll_interval"]),
        qemu=QemuImg(qemu_img=script),
    )
    for name in ("r1", "r2"):
        se.connect_storage_repository(name, "localfs-1.0", {"path": str(spec[name])})
    print(se.copy_image("r2", str(spec["snapshot"])), flush=True)
    time.sleep(3600)


def one_round(work: str, lease_timeout: float, poll_interval: float) -> float:
    paths = {name: os.path.join(work, name) for name in ("r1", "r2")}
    with StorageEngine("host-setup", state_dir=os.path.join(work, "state-setup")) as se:
        for name, path in paths.items():
            os.mkdir(path)
            se.create_storage_repository("localfs-1.0", {"path": path})
            se.connect_storage_repository(name, "localfs-1.0", {"path": path})
        disk = se.create_virtual_disk("r1", 64 * MiB)
        se.wait_for_image("r1", disk, timeout=60)
        prepared = se.prepare_image("r1", disk)
        QemuImg().write_pattern(prepared.path, prepared.format, 0, 64 * MiB, 0x5A)
        se.teardown_image("r1", disk)
        snapshot = se.create_snapshot("r1", disk)
        se.wait_for_image("r1", disk, timeout=60)
    spec = {"work": work, "lease_timeout": lease_timeout, "poll_interval": poll_interval}
    spec.update(paths, snapshot=snapshot)
    a = subprocess.Popen(
        [sys.executable, __file__, "--host-a", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its qemu-img too
    )
    assert a.stdout is not None
    log = OperationLog.open(os.path.join(paths["r2"], "log"), "bench")
    try:
        if not a.stdout.readline():
            raise RuntimeError(f"host A failed to start (exit status {a.wait()})")
        deadline = time.monotonic() + 60
        while not _times(log, "StageProgressed", "host-a"):
            if time.monotonic() > deadline or a.poll() is not None:
                raise RuntimeError("host A never started its copy")
            time.sleep(0.01)
        # B joins once A holds the claim (joining earlier, it could win the first claim), and
        # watches A's heartbeat for a while before the kill, as a survivor in a cluster has.
        with StorageEngine(
            "host-b",
            state_dir=os.path.join(work, "state-b"),
            lease_timeout=lease_timeout,
            poll_interval=poll_interval,
        ) as b:
            for name, path in paths.items():
                b.connect_storage_repository(name, "localfs-1.0", {"path": path})
            time.sleep(lease_timeout / 2)
            killed_ns = time.time_ns()
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
            deadline = time.monotonic() + 10 * lease_timeout + 60
            while not (claimed := _times(log, "StageClaimed", "host-b")):
                if time.monotonic() > deadline:
                    raise RuntimeError("host B never took the stage over")
                time.sleep(0.01)
            return (claimed[0] - killed_ns) / 1e9
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
        log.close()


def _times(log: OperationLog, event: str, host: str) -> list[int]:
    log.refresh()
    return [r.time_ns for r in log.read() if r.topic.endswith(f".{event}") and r.host_id == host]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--host-a":
        host_a(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--lease-timeout", type=float, default=5.0)
    parser.add_argument("--poll-interval", type=float, default=1.0)  # the engine's default
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="strata-bench-takeover-", dir=args.dir)
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    try:
        takeovers = []
        for n in range(args.rounds):
            round_dir = os.path.join(work, f"round-{n}")
            os.mkdir(round_dir)
            takeovers.append(one_round(round_dir, args.lease_timeout, args.poll_interval))
        median = statistics.median(takeovers)
        print(f"lease_timeout: {args.lease_timeout:.1f}")
        print(f"poll_interval: {args.poll_interval:.1f}")
        print(f"takeover_seconds: {median:.2f} (max {max(takeovers):.2f}, {args.rounds} rounds)")
        over = median - args.lease_timeout
        print(f"takeover_seconds_over_lease_timeout: {over:.2f} (target <= 2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
