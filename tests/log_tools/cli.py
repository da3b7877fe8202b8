"""How the strata-log tests run the tool and read its answers, and the story run they run it
on (made once by the ``story`` fixture, conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
