"""Every command on a log it cannot read as a log: one line and an exit status that says why,
never a traceback. A read-only log is no obstacle: the tools only read.

Exit status 1 is damage (a directory where a segment belongs), 2 a path that is no log, 3 a
read the operating system refused (the log may be sound).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.log import segments
from tests.log_tools.cli import Story, one_line_error, strata_log

COMMANDS = ["verify", "dump", "history", "replay", "export", "graph", "hosts", "follow"]


def arguments(name: str, story: Story, out: Path) -> list[str | Path]:
    """What ``name`` takes after PATH."""
    takes: dict[str, list[str | Path]] = {
        "history": [story.ids["web"]],
        "export": [out / "strata.sqlite"],
        "follow": ["--timeout", "0.3"],
    }
    return takes.get(name, [])


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_a_segment_that_is_a_directory_is_damage_named_in_one_line(
    story: Story, log_copy: Path, tmp_path: Path, name: str, which: str
) -> None:
    numbers = segments.list_segments(str(log_copy / "log"))
    number = {"first": numbers[0], "middle": numbers[1], "last": numbers[-1]}[which]
    segment = log_copy / "log" / segments.segment_name(number)
    segment.unlink()
    segment.mkdir()
    done = strata_log(name, log_copy, *arguments(name, story, tmp_path))
    one_line_error(done, 1, "log_corrupted", f"segment {number} at byte offset 0", "regular file")
    assert not (tmp_path / "strata.sqlite").exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_a_path_that_is_a_file_or_missing_is_refused_in_one_line(
    story: Story, tmp_path: Path, name: str
) -> None:
    (tmp_path / "file").write_text("not a log")
    rest = arguments(name, story, tmp_path)
    one_line_error(strata_log(name, tmp_path / "file", *rest), 2, "not a directory")
    one_line_error(strata_log(name, tmp_path / "missing", *rest), 2, "no such file")
    assert not (tmp_path / "strata.sqlite").exists()


# --- as a user other than the repository's owner ------------------------------------------

NOBODY = "nobody"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own are root's alone), removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the tools as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run the tools as another user")
    made = Path(tempfile.mkdtemp(prefix="strata-log-users-"))
    made.chmod(0o711)
    try:
        yield made
    finally:
        shutil.rmtree(made)


def as_nobody(*args: str | Path) -> subprocess.CompletedProcess[str]:
    user = pwd.getpwnam(NOBODY)
    return subprocess.run(
        [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            sys.executable, "-m", "log_tools", *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def owned_by_nobody(story: Story, shared: Path) -> tuple[Path, Path]:
    """A copy of the story's repository and an output directory, both nobody's."""
    user = pwd.getpwnam(NOBODY)
    repo, out = shared / "repo", shared / "out"
    shutil.copytree(story.repo, repo)
    out.mkdir()
    for path in [repo, *repo.rglob("*"), out]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return repo, out


@pytest.mark.parametrize("name", COMMANDS)
def test_a_read_only_log_is_read_by_every_command(
    story: Story, shared_dir: Path, name: str
) -> None:
    repo, out = owned_by_nobody(story, shared_dir)
    for segment in (repo / "log").glob("segment-*.log"):
        segment.chmod(0o444)
    (repo / "log" / "lock").chmod(0o444)
    for directory in (repo / "log", repo):
        directory.chmod(0o555)
    done = as_nobody(name, repo, *arguments(name, story, out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("name", COMMANDS)
def test_a_log_the_user_may_not_read_is_refused_in_one_line_not_called_damage(
    story: Story, shared_dir: Path, name: str
) -> None:
    repo, out = owned_by_nobody(story, shared_dir)
    segment = repo / "log" / segments.segment_name(1)
    segment.chmod(0o000)
    rest = arguments(name, story, out)
    # The engine may name the log (its PermissionDenied), the boundary names the file
    # (log_tools/failures.py): either way the line says where, and that it is permission.
    one_line_error(as_nobody(name, repo, *rest), 3, str(repo / "log"), "ermission denied")
    segment.chmod(0o644)
    repo.chmod(0o700)
    os.chown(repo, 0, 0)  # root's, and closed to others
    for path in (repo, repo / "log"):
        one_line_error(as_nobody(name, path, *rest), 3, str(path), "ermission denied")
    assert os.listdir(out) == []


def test_an_output_the_user_may_not_write_is_refused_in_one_line(
    story: Story, shared_dir: Path
) -> None:
    repo, _ = owned_by_nobody(story, shared_dir)
    closed = shared_dir / "closed"
    closed.mkdir(mode=0o755)  # root's: nobody may not create a file in it
    commands: list[list[str | Path]] = [
        ["export", closed / "x.sqlite"],
        ["graph", "-o", closed / "g.dot"],
    ]
    for command in commands:
        name, *rest = command
        done = as_nobody(name, repo, *rest)
        one_line_error(done, 3, "tool_failed", f"cannot write {rest[-1]}", "Permission denied")
    assert os.listdir(closed) == []
