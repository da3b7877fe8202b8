"""A real ``strata serve`` in a subprocess on a short Unix socket, and an httpx client for it.

Imports: the storage daemon adapter (to stop it at the end); the standard library, pytest and
httpx (the daemon is driven only over HTTP).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.formats.qemu.storage_daemon import StorageDaemon

STARTUP_TIMEOUT = 30.0


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_config(
    path: Path,
    *,
    host_id: str,
    state_dir: str,
    socket: str,
    repositories: list[dict[str, Any]] = (),  # type: ignore[assignment]
    tcp: dict[str, Any] | None = None,
    lease_timeout: float | None = None,
) -> None:
    lines = [
        f"host_id = {toml_value(host_id)}",
        f"state_dir = {toml_value(state_dir)}",
        f"socket = {toml_value(socket)}",
    ]
    if lease_timeout is not None:
        lines.append(f"lease_timeout = {lease_timeout}")
    for repo in repositories:
        lines.append("[[repositories]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in repo.items())
    if tcp is not None:
        lines.append("[tcp]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in tcp.items())
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Daemon:
    """One ``strata serve`` process; ``client`` talks to it over its Unix socket."""

    config: Path
    socket: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strata_server.serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"strata serve exited {self.proc.returncode}: {self.logs()}")
            try:
                if self.client().get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"strata serve did not answer in time: {self.logs()}")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        c = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket),
            base_url="http://strata",
            timeout=timeout,
        )
        self.clients.append(c)
        return c

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait for it: its exit status."""
        assert self.proc is not None
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Place:
    """A short temporary directory holding the socket, the config, repositories and a state dir."""

    root: Path

    def repo(self, name: str) -> str:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return str(path)

    @property
    def state_dir(self) -> str:
        path = self.root / "st"
        path.mkdir(exist_ok=True)
        return str(path)


@pytest.fixture
def place() -> Iterator[Place]:
    root = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    try:
        yield Place(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(place: Place) -> Iterator[Callable[..., Daemon]]:
    """``daemon(repositories=[...], tcp={...}, host_id=...)``: a started ``strata serve``;
    every one is stopped at the end (SIGTERM, then SIGKILL), and its storage daemon too."""
    started: list[Daemon] = []

    def start(host_id: str = "host-a", **config: Any) -> Daemon:
        path = place.root / f"{host_id}.toml"
        sock = str(place.root / f"{host_id}.sock")
        write_config(path, host_id=host_id, state_dir=place.state_dir, socket=sock, **config)
        d = Daemon(path, sock, place.root / f"{host_id}.log")
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in started:
            try:
                if d.proc is not None and d.proc.poll() is None:
                    d.stop()
            except subprocess.TimeoutExpired:
                pass
            finally:
                d.kill()
        _stop_storage_daemon(place.state_dir)


def _stop_storage_daemon(state_dir: str) -> None:
    StorageDaemon(state_dir).stop()


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)
