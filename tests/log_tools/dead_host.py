"""A host that requests a disk and is killed -9 right after its executor claims the stage.

Usage: ``python dead_host.py <repository> <state dir>``; prints the disk's id, then dies by
the crash point ``stage.after-claim`` (engine/executors/crashpoints.py). Its heartbeat record
stays behind in ``<repository>/hosts/host-dead``, never renewed again.
"""

from __future__ import annotations

import sys
import time

from engine import StorageEngine
from engine.executors.crashpoints import AFTER_CLAIM, CrashPoints

MiB = 2**20


def main(repo: str, state_dir: str) -> None:
    se = StorageEngine(
        "host-dead",
        state_dir=state_dir,
        poll_interval=0.1,
        lease_timeout=1.0,
        crashpoints=CrashPoints(AFTER_CLAIM),
    )
    se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
    print(se.create_virtual_disk("r1", MiB, user_data={"name": "victim"}), flush=True)
    time.sleep(60)  # the executor kills this process long before
    raise SystemExit("the crash point never fired")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
