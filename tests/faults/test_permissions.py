"""Permissions as a user without root's privileges: every refusal is a typed error.

Root writes through any permission bits, so the calls run in a child process as ``nobody``
(tests/faults/as_user.py, under ``setpriv``); the repository is handed to that user first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from engine import StorageEngine

NOBODY = 65534
SCRIPT = os.path.join(os.path.dirname(__file__), "as_user.py")


@pytest.fixture
def workdir() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a call as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run a call as another user")
    path = tempfile.mkdtemp(prefix="strata-perm-")  # not under pytest's 0700 tmp_path
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(scenario: str, repo: str, state: str) -> dict[str, object]:
    done = subprocess.run(
        [
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, SCRIPT, scenario, repo, state,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # no traceback: a typed error or success
    assert done.stderr == "", done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def handed_over(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, NOBODY, NOBODY)


def formatted(workdir: str) -> str:
    repo = os.path.join(workdir, "repo")
    os.mkdir(repo)
    with StorageEngine("host-a", state_dir=os.path.join(workdir, "state-a")) as se:
        se.create_storage_repository("localfs-1.0", {"path": repo})
        se.connect_storage_repository("r1", "localfs-1.0", {"path": repo})
        se.create_virtual_disk("r1", 2**20)
    handed_over(repo)
    return repo


def state_of_nobody(workdir: str) -> str:
    state = tempfile.mkdtemp(prefix="state-", dir=workdir)
    os.chown(state, NOBODY, NOBODY)
    return state


def test_formatting_a_directory_the_user_may_not_write_is_permission_denied(
    workdir: str,
) -> None:
    repo = os.path.join(workdir, "repo")
    os.mkdir(repo, 0o555)
    os.chown(repo, NOBODY, NOBODY)
    os.chmod(repo, 0o555)
    result = as_nobody("create", repo, state_of_nobody(workdir))
    assert result["code"] == "permission_denied", result
    assert os.listdir(repo) == []


def test_a_hosts_directory_the_user_may_not_write_is_permission_denied(workdir: str) -> None:
    repo = formatted(workdir)
    os.chmod(os.path.join(repo, "hosts"), 0o555)
    result = as_nobody("connect", repo, state_of_nobody(workdir))
    assert result["code"] == "permission_denied", result
    # An auditor appends nothing and claims nothing: it needs no heartbeat, and reads.
    assert as_nobody("audit", repo, state_of_nobody(workdir)) == {"ok": True}


def test_a_segment_the_user_may_not_write_is_permission_denied_and_nothing_appended(
    workdir: str,
) -> None:
    repo = formatted(workdir)
    segment = os.path.join(repo, "log", "segment-0000000001.log")
    os.chmod(segment, 0o444)
    size = os.path.getsize(segment)
    result = as_nobody("append", repo, state_of_nobody(workdir))
    assert result["code"] == "permission_denied", result
    assert os.path.getsize(segment) == size


def test_a_state_directory_the_user_may_not_write_is_permission_denied(workdir: str) -> None:
    repo = formatted(workdir)
    state = os.path.join(workdir, "state-root")
    os.mkdir(state, 0o755)  # root's: nobody may not write it
    result = as_nobody("audit", repo, state)
    assert result["code"] == "permission_denied", result
