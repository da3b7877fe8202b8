"""One real engine run shared by the strata-log tests (story.py), and copies of it to damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.log_tools.cli import Story

STORY = Path(__file__).with_name("story.py")


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
