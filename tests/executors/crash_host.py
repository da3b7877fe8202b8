"""A host that runs every stage it can in a repository, with the crash point named by
STRATA_CRASH_AT armed: the stand-in for a host killed -9 at that point.

Usage: python crash_host.py <repository path> <host id>
"""

from __future__ import annotations

import os
import sys

# Run as a file, it imports the suite's helpers (tests.*) from the project root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine.executors.crashpoints import CrashPoints
from tests.executors.executor_repos import Repo


def main(path: str, host_id: str) -> None:
    repo = Repo(path, host_id, create=False)
    try:
        repo.executor(crashpoints=CrashPoints.from_environ(os.environ)).run_once()
    finally:
        repo.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
