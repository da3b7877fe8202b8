"""One real engine run shared by the strata-log tests, and how to run the tool on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

STORY = Path(__file__).with_name("story.py")


@dataclass(frozen=True)
class Story:
    repo: Path
    ids: dict[str, str]
    points: list[dict[str, Any]]  # what the facade reported, and at which log position

    @property
    def log(self) -> Path:
        return self.repo / "log"

    def point(self, name: str) -> dict[str, Any]:
        (found,) = [p for p in self.points if p["name"] == name]
        return found


@pytest.fixture(scope="session")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    """story.py's run: several hosts, real executors and qemu-img, a log of 4 KiB segments."""
    root = tmp_path_factory.mktemp("story")
    done = subprocess.run(
        [sys.executable, str(STORY), str(root)],
        env={**os.environ, "STRATA_SEGMENT_SIZE": "4096"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    told = json.loads(done.stdout)
    return Story(Path(told["repo"]), told["ids"], told["points"])


@pytest.fixture
def log_copy(story: Story, tmp_path: Path) -> Path:
    """A copy of the story's repository, to append to or damage."""
    copy = tmp_path / "repo"
    shutil.copytree(story.repo, copy)
    return copy


def strata_log(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "log_tools", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def data(*args: str | Path) -> Any:
    """The tool's JSON output of a command that must succeed."""
    done = strata_log(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """Assert the command failed with ``status`` and one line on stderr saying ``words``."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("strata-log: error ["), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
