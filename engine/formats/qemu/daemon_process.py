"""The host's one ``qemu-storage-daemon`` process: where it lives, finding, starting, ending it.

The daemon stands in for the virtual machines, so it must outlive the engine process that started
it (docs/adr/0027): it runs in a session of its own, its output goes to a file, and everything a
restarted engine needs to find it is in one directory of the host's state dir: the QMP socket,
the NBD socket and the pid file QEMU writes (and locks) once it is listening. A pid is trusted only
while ``/proc`` says it is a live ``qemu-storage-daemon``: a pid file outlives a killed daemon, and
its number may by then belong to anyone.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from engine.errors import DaemonError, InvalidParameter

PROGRAM = "qemu-storage-daemon"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, the last one a NUL
_POLL = 0.02


@dataclass(frozen=True)
class DaemonPaths:
    """The files of a host's daemon, all in ``directory`` (``<state_dir>/daemon``)."""

    directory: str

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.directory, "qmp.sock")

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.directory, "nbd.sock")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.directory, "daemon.pid")

    @property
    def log_file(self) -> str:
        return os.path.join(self.directory, "daemon.log")

    @property
    def start_lock(self) -> str:
        return os.path.join(self.directory, "start.lock")

    def check(self) -> None:
        """:class:`InvalidParameter` if a socket path is too long for a Unix socket."""
        for path in (self.qmp_socket, self.nbd_socket):
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                raise InvalidParameter(
                    f"a directory whose daemon sockets fit in {_SUN_PATH_MAX} bytes, not {path}",
                    name="state_dir",
                )


def running_pid(paths: DaemonPaths) -> int | None:
    """The pid of the live daemon the pid file names, or None."""
    try:
        with open(paths.pid_file) as f:
            pid = int(f.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 0 and is_daemon(pid) else None


def is_daemon(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) ``qemu-storage-daemon``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            program = f.read().split(b"\0")[0]
    except (OSError, IndexError):
        return False
    return state != b"Z" and os.path.basename(program) == PROGRAM.encode()


@contextmanager
def start_lock(paths: DaemonPaths) -> Iterator[None]:
    """Held while finding or starting the daemon: two engines starting at once make one."""
    fd = os.open(paths.start_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start(paths: DaemonPaths, *, timeout: float) -> subprocess.Popen[bytes]:
    """Start the daemon and return once it listens on both sockets (its pid file is written
    after the monitor and the NBD server are set up)."""
    for stale in (paths.qmp_socket, paths.nbd_socket, paths.pid_file):
        if os.path.lexists(stale):
            os.unlink(stale)
    command = [
        PROGRAM,
        "--chardev",
        f"socket,id=strata-qmp,path={paths.qmp_socket},server=on,wait=off",
        "--monitor",
        "chardev=strata-qmp",
        "--nbd-server",
        f"addr.type=unix,addr.path={paths.nbd_socket}",
        "--pidfile",
        paths.pid_file,
    ]
    with open(paths.log_file, "ab") as log:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C or the end of the engine's session spares it
                close_fds=True,
            )
        except OSError as e:
            raise _failed("start", f"{PROGRAM} could not be run: {e}", paths) from e
    deadline = time.monotonic() + timeout
    while running_pid(paths) != process.pid:
        if process.poll() is not None:
            raise _failed("start", f"{PROGRAM} exited with {process.returncode}", paths)
        if time.monotonic() > deadline:
            kill(process.pid, process)
            raise _failed("start", f"{PROGRAM} was not ready within {timeout} s", paths)
        time.sleep(_POLL)
    return process


def wait_gone(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """Whether the daemon ended within ``timeout``; our own child is reaped on the way."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            return True
        if process is None and not is_daemon(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)


def kill(pid: int, process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the daemon (only if ``pid`` is still one) and reap it if it is our child."""
    if is_daemon(pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if process is not None:
        process.wait()
    else:
        wait_gone(pid, None, 5.0)


def _failed(command: str, desc: str, paths: DaemonPaths) -> DaemonError:
    return DaemonError(command=command, error_class=None, desc=desc, socket=paths.qmp_socket)
