"""The host's storage daemon, for real: a qcow2 chain served over NBD to ``qemu-io`` playing the
virtual machine, a daemon that outlives the process that started it, refusals as typed errors,
and the live work on a served chain: snapshots under a writing VM, stream, commit (intermediate,
active with a pivot, cancelled when ready), job speed, waits and ids.

Every test's daemon is ended in a finalizer, by QMP ``quit`` and then by pid, even if it failed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from engine.errors import DaemonError, InvalidParameter
from engine.formats.qemu import daemon_process
from engine.formats.qemu.storage_daemon import ChainVolume, Export, StorageDaemon
from tests.vm import GuestWriter, KiB, qemu_io, run

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


# --- live snapshots, reopening, block jobs -----------------------------------------------------
def volumes(directory: Path, *names: str) -> list[ChainVolume]:
    """A chain of 4 MiB qcow2 volumes, base first, each node named as its file: the base full of
    0x11, each overlay empty and naming the one below by a relative name."""
    paths = [directory / f"{name}.qcow2" for name in names]
    run("qemu-img", "create", "-q", "-f", "qcow2", paths[0], str(4 * MiB))
    qemu_io(paths[0], "qcow2", "write -P 0x11 0 4M")
    for below, path in itertools.pairwise(paths):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", below.name, "-F", "qcow2", "-u",
            path, str(4 * MiB), cwd=directory)  # fmt: skip
    return [ChainVolume(name, str(path), "qcow2") for name, path in zip(names, paths, strict=True)]


def overlay(directory: Path, name: str, below: ChainVolume) -> ChainVolume:
    """An empty overlay made as the engine makes one: ``qemu-img create -u``, relative name."""
    path = directory / f"{name}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(below.path),
        "-F", "qcow2", "-u", path, str(4 * MiB), cwd=directory)  # fmt: skip
    return ChainVolume(name, str(path), "qcow2")


def expected(directory: Path, *writes: str) -> Path:
    """A raw 4 MiB image of 0x11 with ``writes`` (qemu-io commands) on it."""
    image = directory / "expected.raw"
    run("qemu-img", "create", "-q", "-f", "raw", image, str(4 * MiB))
    qemu_io(image, "raw", "write -P 0x11 0 4M", *writes)
    return image


def same_content(image: Path, other: str | Path, fmt: str = "raw") -> None:
    """``qemu-img compare`` of a raw image with an export's address or a volume (and its chain),
    sharing the locks of a volume that the daemon still has open."""
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, image, other)


def header(volume: ChainVolume) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        run("qemu-img", "info", "-U", "--output=json", volume.path).stdout
    )
    return info


def served_chain(daemon: StorageDaemon, vols: list[ChainVolume], name: str) -> str:
    return daemon.export_nbd(daemon.add_chain(vols, read_only=False), name, writable=True)


def test_a_live_snapshot_under_a_writing_vm_switches_its_export_to_the_overlay(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, top = volumes(tmp_path, "base", "top")
    daemon = daemons.open()
    uri = served_chain(daemon, [base, top], "d")
    assert (daemon.export_node("d"), daemon.backing_chain("top")) == ("top", ["top", "base"])
    over = overlay(tmp_path, "over", top)
    assert daemon.add_overlay(over) == "over"

    with GuestWriter(uri, length=4 * MiB, block=4 * KiB, pause=0.001) as writer:
        writer.wait_for_writes(50)
        before = len(writer.writes)
        daemon.snapshot([("top", "over")])
        after = len(writer.writes)
        writer.wait_for_writes(after + 50)
        writer.verify(uri, "raw")  # no error, and every acknowledged write reads back
    written = [(w.offset, w.pattern) for w in writer.writes]
    assert len(written) < 1024  # each block written once: where a write went is unambiguous

    assert daemon.export_node("d") == "over"
    assert daemon.backing_chain("over") == ["over", "top", "base"]
    writes = [f"write -P {pattern:#x} {offset} 4k" for offset, pattern in written]
    same_content(expected(tmp_path, *writes), uri)
    # The old top holds what was written before the call and nothing sent after it returned
    # (the one write that may have been under way while it ran can be on either side).
    old_top = [f"read -P {p:#x} {o} 4k" for o, p in written[:before]]
    old_top += [f"read -P 0x11 {o} 4k" for o, _ in written[after + 1 :]]
    run("qemu-io", "-U", "-r", "-f", "qcow2", top.path, *(a for c in old_top for a in ("-c", c)))
    daemon.unexport("d")
    daemon.remove_nodes(["over", "top", "base"])
    same_content(expected(tmp_path, *writes), over.path, "qcow2")
    assert header(over)["backing-filename"] == "top.qcow2"


def test_a_snapshot_of_two_disks_switches_both_or_neither(daemons: Daemons, tmp_path: Path) -> None:
    daemon = daemons.open()
    disks = []
    for n in ("1", "2"):
        (tmp_path / n).mkdir()
        base, top = volumes(tmp_path / n, "base" + n, "top" + n)
        disks.append(
            (served_chain(daemon, [base, top], "d" + n), top, overlay(tmp_path / n, "o" + n, top))
        )
    daemon.add_overlay(disks[0][2])

    with pytest.raises(DaemonError) as refused:
        daemon.snapshot([("top1", "o1"), ("top2", "o2")])  # o2 is not open: nothing switches
    assert refused.value.command == "transaction"
    assert [daemon.export_node("d1"), daemon.export_node("d2")] == ["top1", "top2"]

    daemon.add_overlay(disks[1][2])
    daemon.snapshot([("top1", "o1"), ("top2", "o2")])

    assert [daemon.export_node("d1"), daemon.export_node("d2")] == ["o1", "o2"]
    for (uri, _, _), pattern in zip(disks, ("0x5a", "0x6b"), strict=True):
        qemu_io(uri, "raw", f"write -P {pattern} 0 1M")
    for n, (_, top, over), pattern in zip("12", disks, ("0x5a", "0x6b"), strict=True):
        daemon.unexport("d" + n)
        daemon.remove_nodes(["o" + n, "top" + n, "base" + n])
        qemu_io(Path(top.path), "qcow2", "read -P 0x11 0 4M", read_only=True)  # unchanged
        qemu_io(Path(over.path), "qcow2", f"read -P {pattern} 0 1M", "read -P 0x11 1M 3M")


@pytest.mark.parametrize("partial", [False, True], ids=["full", "down-to-a-base"])
def test_a_stream_pulls_the_volumes_below_into_the_top_and_relinks_it(
    daemons: Daemons, tmp_path: Path, partial: bool
) -> None:
    base, mid, top = volumes(tmp_path, "base", "mid", "top")
    qemu_io(Path(top.path), "qcow2", "write -P 0x33 3M 1M")
    qemu_io(Path(mid.path), "qcow2", "write -P 0x22 1M 1M")
    daemon = daemons.open()
    uri = served_chain(daemon, [base, mid, top], "d")

    daemon.stream(
        "pull",
        "top",
        base_node="base" if partial else None,
        backing_file="base.qcow2" if partial else None,
    )
    job = daemon.wait_job("pull", {"concluded"}, timeout=20)

    assert (job.type, job.status, job.error) == ("stream", "concluded", None)
    assert daemon.backing_chain("top") == (["top", "base"] if partial else ["top"])
    content = expected(tmp_path, "write -P 0x22 1M 1M", "write -P 0x33 3M 1M")
    same_content(content, uri)
    daemon.dismiss_job("pull")
    daemon.unexport("d")
    daemon.remove_nodes(["top", "mid", "base"])
    info = header(top)
    assert info.get("backing-filename") == ("base.qcow2" if partial else None)
    assert "json:" not in json.dumps(info)
    same_content(content, top.path, "qcow2")
    qemu_io(Path(mid.path), "qcow2", "read -P 0x22 1M 1M", "read -P 0x11 2M 2M")


def test_an_intermediate_commit_needs_its_base_reopened_writable_and_relinks_the_top(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, mid, top = volumes(tmp_path, "base", "mid", "top")
    qemu_io(Path(mid.path), "qcow2", "write -P 0x22 1M 2M")
    qemu_io(Path(top.path), "qcow2", "write -P 0x33 2M 1M")
    daemon = daemons.open()
    uri = served_chain(daemon, [base, mid, top], "d")

    def commit() -> None:
        daemon.commit("merge", "top", top_node="mid", base_node="base", backing_file="base.qcow2")

    with pytest.raises(DaemonError, match="read-only"):
        commit()  # the base was opened read-only, as every volume below the top is
    daemon.reopen(base, below=None, read_only=False)
    commit()
    job = daemon.wait_job("merge", {"concluded"}, timeout=20)
    daemon.reopen(base, below=None, read_only=True)

    assert (job.type, job.error) == ("commit", None)
    assert daemon.backing_chain("top") == ["top", "base"]
    content = expected(tmp_path, "write -P 0x22 1M 2M", "write -P 0x33 2M 1M")
    same_content(content, uri)
    daemon.dismiss_job("merge")
    daemon.unexport("d")
    daemon.remove_nodes(["top", "mid", "base"])
    info = header(top)
    assert info["backing-filename"] == "base.qcow2"
    assert "json:" not in json.dumps(info)
    same_content(content, top.path, "qcow2")
    qemu_io(Path(base.path), "qcow2", "read -P 0x11 0 1M", "read -P 0x22 1M 2M")


def active_commit_ready(daemon: StorageDaemon, base: ChainVolume, uri: str) -> None:
    """Base <- top served as ``d``, with 0x5a in the top's first MiB; commit it until ready."""
    qemu_io(uri, "raw", "write -P 0x5a 0 1M")
    daemon.reopen(base, below=None, read_only=False)
    daemon.commit("act", "top", top_node="top", base_node="base", backing_file=None)
    assert daemon.wait_job("act", {"ready"}, timeout=20).status == "ready"


def test_an_active_commit_pivots_the_export_to_the_base_when_completed(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, top = volumes(tmp_path, "base", "top")
    daemon = daemons.open()
    uri = served_chain(daemon, [base, top], "d")
    active_commit_ready(daemon, base, uri)

    # While it runs, the export is on the job's filter node, which both queries look through.
    assert daemon.query_exports()[0].node.startswith("#")
    assert (daemon.export_node("d"), daemon.backing_chain("top")) == ("top", ["top", "base"])
    daemon.complete_job("act")
    job = daemon.wait_job("act", {"concluded"}, timeout=20)

    assert job.error is None
    assert (daemon.export_node("d"), daemon.backing_chain("base")) == ("base", ["base"])
    qemu_io(uri, "raw", "write -P 0x66 1M 1M")
    daemon.dismiss_job("act")
    assert daemon.find_job("act") is None
    assert daemon.query_jobs() == []
    daemon.unexport("d")
    daemon.remove_nodes(["top", "base"])
    qemu_io(Path(base.path), "qcow2", "read -P 0x5a 0 1M", "read -P 0x66 1M 1M",
            "read -P 0x11 2M 2M")  # fmt: skip


@pytest.mark.parametrize("force", [False, True], ids=["cancel", "force"])
def test_a_ready_active_commit_cancelled_leaves_the_chain_as_it_was(
    daemons: Daemons, tmp_path: Path, force: bool
) -> None:
    base, top = volumes(tmp_path, "base", "top")
    daemon = daemons.open()
    uri = served_chain(daemon, [base, top], "d")
    active_commit_ready(daemon, base, uri)

    daemon.cancel_job("act", force=force)
    job = daemon.wait_job("act", {"concluded"}, timeout=20)

    # Without force a ready job ends as done without a pivot; forced, as cancelled.
    assert job.error == ("Operation canceled" if force else None)
    assert (daemon.export_node("d"), daemon.backing_chain("top")) == ("top", ["top", "base"])
    qemu_io(uri, "raw", "write -P 0x77 2M 1M")
    same_content(expected(tmp_path, "write -P 0x5a 0 1M", "write -P 0x77 2M 1M"), uri)
    daemon.unexport("d")
    daemon.remove_nodes(["top", "base"])
    qemu_io(Path(base.path), "qcow2", "read -P 0x11 2M 2M")  # the later write stayed in the top


def test_a_jobs_speed_is_set_and_read_and_a_wait_for_it_times_out_with_a_typed_error(
    daemons: Daemons, tmp_path: Path
) -> None:
    base, top = volumes(tmp_path, "base", "top")
    daemon = daemons.open()
    served_chain(daemon, [base, top], "d")
    daemon.stream("slow", "top", base_node=None, backing_file=None, speed=1)
    job = daemon.wait_job("slow", {"running"}, timeout=10)
    assert (job.id, job.type, job.total_progress, job.error, job.speed) == (
        "slow",
        "stream",
        4 * MiB,
        None,
        1,
    )

    with pytest.raises(DaemonError) as late:
        daemon.wait_job("slow", {"ready"}, timeout=0.2)
    assert (late.value.command, late.value.error_class) == ("query-jobs", None)
    cancel = threading.Event()
    cancel.set()
    assert daemon.wait_job("slow", {"ready"}, timeout=10, cancel=cancel).status == "running"
    daemon.set_speed("slow", 2 * MiB)
    assert getattr(daemon.find_job("slow"), "speed", None) == 2 * MiB
    daemon.set_speed("slow", 0)
    assert daemon.wait_job("slow", {"concluded"}, timeout=20).error is None

    daemon.dismiss_job("slow")
    assert daemon.find_job("slow") is None
    with pytest.raises(DaemonError) as gone:
        daemon.wait_job("slow", {"concluded"}, timeout=1)
    assert gone.value.error_class == "DeviceNotFound"
    with pytest.raises(DaemonError):
        daemon.backing_chain("nothing")


@pytest.mark.parametrize("job_id", ["1st", "a" * 32, "", "a b"])
def test_a_bad_job_id_is_refused_before_the_daemon_is_asked(daemons: Daemons, job_id: str) -> None:
    daemon = daemons.open()
    with pytest.raises(InvalidParameter):
        daemon.stream(job_id, "top", base_node=None, backing_file=None)
    with pytest.raises(InvalidParameter):
        daemon.commit(job_id, "top", top_node="top", base_node="base", backing_file=None)
    assert daemon.pid is None
