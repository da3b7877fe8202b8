"""The host's storage daemon, for real: a qcow2 chain served over NBD to ``qemu-io`` playing the
virtual machine, a daemon that outlives the process that started it, and refusals as typed errors.

Every test's daemon is ended in a finalizer, by QMP ``quit`` and then by pid, even if it failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from engine.errors import DaemonError, InvalidParameter
from engine.formats.qemu import daemon_process
from engine.formats.qemu.storage_daemon import ChainVolume, Export, StorageDaemon
from tests.vm import qemu_io, run

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="qemu-storage-daemon is not installed (Debian: qemu-system-common)",
)

MiB = 1024 * 1024


class Daemons:
    """Opens handles on one state dir's daemon and ends whatever runs there afterwards."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.opened: list[StorageDaemon] = []
        self.children: list[subprocess.Popen[str]] = []

    def open(self) -> StorageDaemon:
        daemon = StorageDaemon(self.state_dir, timeout=10.0)
        self.opened.append(daemon)
        return daemon

    def end_all(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        pid = daemon_process.running_pid(StorageDaemon(self.state_dir).paths)
        try:
            for daemon in self.opened:
                with suppress(DaemonError):
                    daemon.close()
            # Each handle stops it in turn: the first ends it, the one that started it reaps it.
            for daemon in [*self.opened, StorageDaemon(self.state_dir, timeout=5.0)]:
                daemon.stop()
        finally:
            if pid is not None and daemon_process.is_daemon(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    # Not tmp_path: its long names would not fit in a Unix socket's 108 bytes.
    state_dir = tempfile.mkdtemp(prefix="strata-sd-")
    handles = Daemons(state_dir)
    try:
        yield handles
    finally:
        try:
            handles.end_all()
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def base_and_overlay(directory: Path) -> tuple[Path, Path]:
    """A 4 MiB base full of 0x11 and an empty overlay naming it by a relative name."""
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(4 * MiB))
    qemu_io(base, "qcow2", "write -P 0x11 0 4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-u", top,
        str(4 * MiB), cwd=directory)  # fmt: skip
    return base, top


def chain(base: Path, top: Path) -> list[ChainVolume]:
    return [ChainVolume("base", str(base), "qcow2"), ChainVolume("top", str(top), "qcow2")]


def test_a_chain_served_over_nbd_takes_writes_into_its_top_volume(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, top = base_and_overlay(tmp_path)
    daemon = daemons.open()
    node = daemon.add_chain(chain(base, top), read_only=False)
    uri = daemon.export_nbd(node, "disk1", writable=True)
    assert uri == f"nbd+unix:///disk1?socket={daemon.paths.nbd_socket}"
    assert daemon.query_exports() == [Export("disk1", "top", "nbd", False)]

    qemu_io(uri, "raw", "write -P 0x5a 0 1M")
    qemu_io(uri, "raw", "read -P 0x5a 0 1M", "read -P 0x11 1M 3M")
    daemon.unexport("disk1")
    daemon.remove_nodes(["top", "base"])

    assert daemon.query_exports() == []
    expected = tmp_path / "expected.raw"
    run("qemu-img", "create", "-q", "-f", "raw", expected, str(4 * MiB))
    qemu_io(expected, "raw", "write -P 0x11 0 4M", "write -P 0x5a 0 1M")
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, top)
    qemu_io(base, "qcow2", "read -P 0x11 0 4M")  # the base was only read
    info = json.loads(run("qemu-img", "info", "--output=json", top).stdout)
    assert info["backing-filename"] == "base.qcow2"


def test_a_read_only_chain_refuses_writes_through_its_export(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, top = base_and_overlay(tmp_path)
    daemon = daemons.open()
    node = daemon.add_chain(chain(base, top), read_only=True)
    uri = daemon.export_nbd(node, "snap", writable=False)

    with pytest.raises(subprocess.CalledProcessError):
        qemu_io(uri, "raw", "write -P 0x5a 0 1M")
    qemu_io(uri, "raw", "read -P 0x11 0 4M", read_only=True)


CHILD = textwrap.dedent(
    """
    import sys, time
    from engine.formats.qemu.storage_daemon import ChainVolume, StorageDaemon

    daemon = StorageDaemon(sys.argv[1])
    node = daemon.add_chain([ChainVolume("disk", sys.argv[2], "qcow2")], read_only=False)
    daemon.export_nbd(node, "disk1", writable=True)
    print(daemon.pid, flush=True)
    time.sleep(600)
    """
)


def test_the_daemon_outlives_the_engine_that_started_it_and_is_found_again(
    daemons: Daemons, tmp_path: Path
) -> None:
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(4 * MiB))
    engine = subprocess.Popen(
        [sys.executable, "-c", CHILD, daemons.state_dir, str(image)],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemons.children.append(engine)
    assert engine.stdout is not None
    started_pid = int(engine.stdout.readline())
    engine.send_signal(signal.SIGKILL)
    engine.wait()

    daemon = daemons.open()
    assert daemon.pid == started_pid
    assert daemon.query_exports() == [Export("disk1", "disk", "nbd", False)]
    assert daemon.query_jobs() == []
    qemu_io(daemon.nbd_uri("disk1"), "raw", "write -P 0x5a 0 1M")
    daemon.unexport("disk1")
    daemon.remove_nodes(["disk"])
    qemu_io(image, "qcow2", "read -P 0x5a 0 1M", "read -P 0 1M 3M")
    assert daemon.pid == started_pid


def test_a_handle_let_go_leaves_the_daemon_serving_and_stop_ends_it(daemons: Daemons) -> None:
    first = daemons.open()
    assert first.pid is None  # nothing runs until it is needed
    assert first.query_exports() == []
    pid = first.pid
    first.close()

    second = daemons.open()
    assert second.query_exports() == []
    assert second.pid == pid
    second.stop()

    assert second.pid is None
    assert not daemon_process.is_daemon(pid or 0)
    second.stop()  # nothing to end: no daemon is started for it
    assert second.pid is None


def test_a_refused_request_raises_a_typed_error_and_the_daemon_keeps_serving(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, top = base_and_overlay(tmp_path)
    daemon = daemons.open()
    uri = daemon.export_nbd(daemon.add_chain(chain(base, top), read_only=False), "d", writable=True)
    pid = daemon.pid

    missing = [ChainVolume("gone", str(tmp_path / "missing.qcow2"), "qcow2")]
    with pytest.raises(DaemonError) as refused:
        daemon.add_chain(missing, read_only=False)

    assert refused.value.command == "blockdev-add"
    assert refused.value.error_class == "GenericError"
    assert "missing.qcow2" in refused.value.desc
    assert refused.value.code == "daemon_error"
    assert daemon.pid == pid
    qemu_io(uri, "raw", "write -P 0x5a 0 1M")
    assert [e.id for e in daemon.query_exports()] == ["d"]


def test_a_failed_chain_leaves_none_of_its_nodes_behind(daemons: Daemons, tmp_path: Path) -> None:
    base, top = base_and_overlay(tmp_path)
    daemon = daemons.open()
    broken = [*chain(base, top), ChainVolume("more", str(tmp_path / "missing.qcow2"), "qcow2")]
    with pytest.raises(DaemonError):
        daemon.add_chain(broken, read_only=False)

    # The same names are free again, and the files are no longer held open.
    daemon.add_chain(chain(base, top), read_only=False)


@pytest.mark.parametrize(
    "volume",
    [
        ChainVolume("0starts-with-a-digit", "/x", "qcow2"),
        ChainVolume("a" * 27, "/x", "qcow2"),
        ChainVolume("v", "/x", "vmdk"),
    ],
    ids=["digit-first", "too-long-for-qemu", "unknown-format"],
)
def test_a_bad_volume_is_refused_before_the_daemon_is_asked(
    daemons: Daemons, volume: ChainVolume
) -> None:
    daemon = daemons.open()
    with pytest.raises(InvalidParameter):
        daemon.add_chain([volume], read_only=True)
    assert daemon.pid is None


def test_a_second_connection_to_a_busy_monitor_fails_in_time_with_a_typed_error(
    daemons: Daemons,
) -> None:
    first = daemons.open()
    first.query_exports()
    second = StorageDaemon(daemons.state_dir, timeout=1.0)
    daemons.opened.append(second)

    # A monitor greets one client at a time: the second waits for a greeting that never comes.
    with pytest.raises(DaemonError) as refused:
        second.query_exports()

    assert refused.value.error_class is None
    assert refused.value.desc == "no answer within 1.0 s"
    assert first.query_exports() == []
