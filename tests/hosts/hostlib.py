"""Helpers for tests with several hosts: host processes to kill, stop and resume, and what a
test reads straight from a repository (its log, its files) without being a host itself."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import StorageEngine
from engine.aggregates import operations as ops
from engine.aggregates.work_rules import will_run
from engine.application import LogConfig, StrataLogApplication
from engine.formats.qemu.image_tools import QemuImg
from engine.log import OperationLog
from engine.log.framing import Record
from engine.projections.view import RepositoryView
from log_tools.cli import main as strata_log

HOST_PROCESS = Path(__file__).with_name("host_process.py")
MiB = 2**20


class HostProcess:
    """One host in its own process group (its qemu-img children included), as a machine."""

    def __init__(
        self, spec: dict[str, Any], *, crash_at: str | None = None, stderr: Any = None
    ) -> None:
        env = dict(os.environ)
        env.pop("STRATA_CRASH_AT", None)
        if crash_at is not None:
            env["STRATA_CRASH_AT"] = crash_at
        os.makedirs(spec["state_dir"], exist_ok=True)
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, str(HOST_PROCESS), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,  # its own process group: SIGSTOP/SIGKILL take qemu-img too
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next message holding ``key`` (earlier ones are kept in :attr:`seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{key!r} not said within {timeout} s; said: {self.seen}")
            try:
                message = self.messages.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.messages.empty():
                    raise AssertionError(
                        f"host exited ({self.proc.returncode}) before saying {key!r}; said: "
                        f"{self.seen}; stderr: {self.stderr()}"
                    ) from None
                continue
            self.seen.append(message)
            if key in message:
                return message

    def saved(self, name: str, timeout: float = 30.0) -> Any:
        while True:
            message = self.wait_for("saved", timeout)
            if message["saved"] == name:
                return message["value"]

    def signal_group(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole host: the process and whatever qemu-img it runs."""
        try:
            self.signal_group(signal.SIGKILL)
        except ProcessLookupError:
            return  # the group is empty: everything in it is dead already
        self.proc.wait(timeout=10)

    def died_of_sigkill(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return self.proc.returncode == -signal.SIGKILL

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 30.0) -> int:
        """Close its stdin (it disconnects and exits) and return its exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            # A host that is gone already cannot read the end of its input; its exit status
            # says how it went.
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()[-3000:]


def host_spec(
    host_id: str, state_dir: str | Path, repos: dict[str, str], **more: Any
) -> dict[str, Any]:
    return {
        "host_id": host_id,
        "state_dir": str(state_dir),
        "repos": repos,
        "lease_timeout": 1.0,
        "poll_interval": 0.1,
        **more,
    }


def records(repo_path: str) -> list[Record]:
    """Every committed record of the repository's log, read as an auditor would."""
    with OperationLog.open(os.path.join(repo_path, "log"), "auditor") as log:
        return log.read()


def events(repo_path: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(event name, host, decoded fields) of every record, in log order."""
    app = StrataLogApplication(LogConfig(log_dir=os.path.join(repo_path, "log"), host_id="audit"))
    try:
        out = []
        for record in app.operation_log.read():
            name = record.topic.rsplit(".", 1)[-1]
            fields = app.mapper.transcoder.decode(record.state)
            out.append((name, record.host_id, fields))
        return out
    finally:
        app.close()


def log_verifies(repo_path: str) -> bool:
    """``strata-log verify`` (its entry point, in this process) says the log is sound."""
    return strata_log(["verify", repo_path]) == 0


class Auditor:
    """A read-only view of a repository's log: what work is still to run, without a host."""

    def __init__(self, repo_path: str) -> None:
        self.app = StrataLogApplication(
            LogConfig(log_dir=os.path.join(repo_path, "log"), host_id="auditor")
        )
        self.view = RepositoryView(self.app)

    def pending(self) -> list[str]:
        """Operations that will still run (pending, on a live image or a clean/merge)."""
        self.view.catch_up()
        return [
            f"{image.id}:{op.purpose}"
            for image in self.view.images()
            for op in image.operations
            if op.state == ops.PENDING and will_run(image, op)
        ]

    def blocked(self) -> list[str]:
        """Operations that wait for a fix: failed, stopped or held."""
        self.view.catch_up()
        return [
            f"{image.id}:{op.purpose}:{op.state}:{op.error}"
            for image in self.view.images()
            for op in image.operations
            if op.state in (ops.FAILED, ops.STOPPED, ops.HELD) and will_run(image, op)
        ]

    def live_volumes(self) -> set[str]:
        """Volume files that some live image's chain goes through."""
        self.view.catch_up()
        return {ref for image in self.view.live_images() for ref in image.chain}

    def close(self) -> None:
        self.view.close()
        self.app.close()


def settle(repo_paths: list[str], timeout: float = 60.0) -> None:
    """Wait until no work will run in any of the repositories (whoever runs it)."""
    auditors = [Auditor(p) for p in repo_paths]
    try:
        eventually(lambda: not any(a.pending() for a in auditors), timeout)
    finally:
        for a in auditors:
            a.close()


def eventually(condition: Callable[[], bool], timeout: float = 30.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(step)


def volume_files(repo_path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(repo_path, "volumes")))


def temporaries(repo_path: str) -> list[str]:
    return [n for n in volume_files(repo_path) if n.startswith(".tmp-")]


def formatted_repositories(root: Path, names: tuple[str, ...] = ("r1", "r2")) -> dict[str, str]:
    """Empty repositories, formatted by a host that then leaves."""
    paths = {name: str(root / name) for name in names}
    with StorageEngine("host-setup", state_dir=str(root / "state-setup")) as se:
        for path in paths.values():
            os.mkdir(path)
            se.create_storage_repository("localfs-1.0", {"path": path})
    return paths


def snapshot_with_data(root: Path, paths: dict[str, str], size: int, byte: int = 0x5A) -> str:
    """A snapshot in r1 whose every byte is ``byte``: copying it takes time when throttled."""
    state = str(root / "state-setup")
    with StorageEngine("host-setup", state_dir=state, poll_interval=0.1) as se:
        se.connect_storage_repository("r1", "localfs-1.0", {"path": paths["r1"]})
        disk = se.create_virtual_disk("r1", size)
        se.wait_for_image("r1", disk, timeout=30)
        prepared = se.prepare_image("r1", disk)
        QemuImg().write_pattern(prepared.path, prepared.format, 0, size, byte)
        se.teardown_image("r1", disk)
        snapshot = se.create_snapshot("r1", disk)
        se.wait_for_image("r1", disk, timeout=30)
        return snapshot


def claims(repo_path: str) -> list[tuple[str, int]]:
    """(host, epoch) of every StageClaimed, in log order."""
    return [(host, f["epoch"]) for name, host, f in events(repo_path) if name == "StageClaimed"]


def progressed_on(repo_path: str, host: str) -> bool:
    # A copy's progress is its checkpoints (docs/adr/0032).
    saved = ("StageProgressed", "StageCheckpointed")
    return any(n in saved and h == host for n, h, _ in events(repo_path))


def host_a_copying(
    root: Path, repos: dict[str, str], slow_rate: str = "2M", **spec: Any
) -> tuple[str, HostProcess, str]:
    """A snapshot with data in r1, and host A (a process) copying it to r2 slowly enough to be
    caught mid-copy: returns once A has persisted progress. (snapshot, A, the copy's id)."""
    snapshot = snapshot_with_data(root, repos, 8 * 2**20)
    steps = [{"call": "copy_image", "args": ["r2", snapshot], "save": "copy"}]
    a = HostProcess(
        host_spec("host-a", root / "a", repos, slow_rate=slow_rate, steps=steps, **spec)
    )
    copy = a.saved("copy")
    eventually(lambda: progressed_on(repos["r2"], "host-a"))
    return snapshot, a, copy


def writer_of(group: int) -> int:
    """The qemu-nbd of the host's process group that writes (not ``--read-only``)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pgrp = int(f.read().rsplit(")", 1)[1].split()[2])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        nbd = any(a.endswith(b"qemu-nbd") for a in argv)
        if pgrp == group and nbd and b"--read-only" not in argv:
            return int(pid)
    raise AssertionError(f"no writing qemu-nbd in process group {group}")


def written_by(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
