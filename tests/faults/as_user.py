"""Run one engine call as another (non-root) user: ``python as_user.py SCENARIO ARGS...``.

Root reads and writes through any permission bits, so the permission tests run this script
under ``setpriv`` as ``nobody``. It prints one JSON line: the error's class and code, or "ok".
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine import StorageEngine
from engine.errors import StrataError


def main(scenario: str, repo: str, state: str) -> None:
    try:
        executors = scenario == "connect"  # an auditor ("audit") runs none
        with StorageEngine("host-b", state_dir=state, run_executors=executors) as se:
            if scenario == "create":
                se.create_storage_repository("localfs-1.0", {"path": repo})
            else:
                se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
                if scenario == "append":
                    se.create_virtual_disk("r1", 2**20)
    except StrataError as e:
        print(json.dumps({"error": type(e).__name__, "code": e.code, "message": e.message}))
        return
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main(*sys.argv[1:])
