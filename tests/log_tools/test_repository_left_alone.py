"""The tools only read: no command creates, changes or removes anything in the repository, and
``export`` writes its database whole or not at all, never inside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.smallfs import FILLER, SmallFs
from tests.log_tools.cli import Story, one_line_error, strata_log
from tests.log_tools.many_images import write_disks


def listing(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under ``root``, itself included: its type and mode, size and mtime. A
    directory's mtime changes when anything is created or removed in it, even for a moment."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (stat.filemode(st.st_mode), st.st_size, st.st_mtime_ns)
    return found


def commands(story: Story, out: Path) -> list[list[str | Path]]:
    drawings: list[list[str | Path]] = [["graph", "-o", out / "chains.dot"]]
    if shutil.which("dot") is not None:
        drawings.append(["graph", "--format", "svg", "-o", out / "chains.svg"])
    return [
        ["verify"], ["verify", "--json"], ["dump"], ["dump", "--json", "--from", "5"],
        ["history", story.ids["web"]], ["replay"], ["replay", "--until", "10"],
        ["export", out / "strata.sqlite"], ["export", out / "strata.sqlite", "--replace"],
        *drawings, ["graph"], ["hosts"], ["hosts", "--json"], ["follow", "--timeout", "0.3"],
    ]  # fmt: skip


@pytest.mark.parametrize("through", ["repository", "log directory"])
def test_no_command_changes_a_file_or_directory_of_the_repository(
    story: Story, log_copy: Path, tmp_path: Path, through: str
) -> None:
    (log_copy / "log" / "lock").unlink()  # as before any host appended: not to be made
    path = log_copy if through == "repository" else log_copy / "log"
    out = tmp_path / "out"
    out.mkdir()
    before = listing(log_copy)
    for command in commands(story, out):
        name, *rest = command
        done = strata_log(name, path, *rest)
        assert done.returncode == 0, (command, done.stderr)
        assert listing(log_copy) == before, command
    assert sorted(os.listdir(out)) == sorted(
        ["strata.sqlite", "chains.dot"] + (["chains.svg"] if shutil.which("dot") else [])
    )


@pytest.mark.parametrize(
    "where",
    ["x.sqlite", "log/x.sqlite", "volumes/x.sqlite", "log/segment-0000000001.log"],
)
def test_export_or_graph_into_the_repository_is_refused(log_copy: Path, where: str) -> None:
    before = listing(log_copy)
    for path in (log_copy, log_copy / "log"):
        target = log_copy / where
        commands: list[list[str | Path]] = [
            ["export", path, target, "--replace"],
            ["graph", path, "-o", target],
        ]
        for command in commands:
            one_line_error(strata_log(*command), 2, str(target), "which the tools only read")
    assert listing(log_copy) == before


def test_export_replacing_a_directory_says_so_and_leaves_nothing(
    story: Story, tmp_path: Path
) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "mine").write_text("kept")
    before = listing(tmp_path)
    for flags in ([], ["--replace"]):
        done = strata_log("export", story.repo, tmp_path / "db", *flags)
        one_line_error(done, 2, f"{tmp_path / 'db'} is a directory; name a file")
        assert listing(tmp_path) == before


def test_export_that_fills_the_disk_midway_leaves_no_file_behind(
    small_fs: Callable[..., SmallFs],
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    write_disks(repo / "log", made=3000, broken=0)  # some 3 MB of events to export
    fs = small_fs(size_mib=16)
    fs.fill(leave=512 * 1024)
    before = set(os.listdir(fs.path))
    done = strata_log("export", repo, Path(fs.path) / "strata.sqlite")
    line = one_line_error(done, 3, "tool_failed", "strata.sqlite failed")
    assert "full" in line
    assert set(os.listdir(fs.path)) == before  # neither the database nor a temporary
    assert FILLER in before


def test_graph_writes_into_a_pipe_in_place_and_export_refuses_one(
    story: Story, tmp_path: Path
) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_bytes()))
    reader.start()
    done = strata_log("graph", story.repo, "-o", pipe)
    reader.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert read[0].startswith(b"digraph strata {")
    assert stat.S_ISFIFO(pipe.lstat().st_mode)  # not replaced by a file
    one_line_error(strata_log("export", story.repo, pipe, "--replace"), 2, "not a regular file")
    assert os.listdir(tmp_path) == ["pipe"]


# The export signals itself as it starts on the hosts table, the events already written: the
# same moment every run, however loaded the machine.
STOPPED_MIDWAY = """
import os, signal, sys
# As started from a terminal: a non-interactive shell starts background jobs with SIGINT ignored
# (and Python then leaves it so), which is not the Ctrl-C this test plays.
signal.signal(signal.SIGINT, signal.default_int_handler)
from log_tools import cli, export
real = export.hosts.hosts_report
def midway(*args, **kwargs):
    os.kill(os.getpid(), int(sys.argv[1]))
    return real(*args, **kwargs)
export.hosts.hosts_report = midway
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_export_stopped_midway_leaves_no_file_behind(
    story: Story, tmp_path: Path, stop: int
) -> None:
    done = subprocess.run(
        [
            sys.executable, "-c", STOPPED_MIDWAY, str(int(stop)),
            "export", str(story.repo), str(tmp_path / "strata.sqlite"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 128 + stop, done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == []


def test_a_heartbeat_that_is_a_pipe_is_a_host_of_unknown_state(log_copy: Path) -> None:
    beat = log_copy / "hosts" / "host-a"
    beat.unlink()
    os.mkfifo(beat)  # opened for reading, it would wait for a writer
    done = strata_log("hosts", log_copy, "--json")
    assert done.returncode == 0, done.stderr
    (host,) = [h for h in json.loads(done.stdout)["hosts"] if h["host_id"] == "host-a"]
    assert host["state"] == "unknown" and host["records"] > 0
