"""Crash safety of a live storage migration (docs/adr/0029), tried with real ``kill -9`` at each
of its states (the ``migration.*`` crash points of engine/executors/crashpoints.py).

An attached disk of r1 moves to r2 while a guest writes through its export. Host A runs the
migration in a process of its own that dies at the armed point, then:

* the engine alone was killed: its daemon lives on and the guest never sees an error; the
  engine restarted on the same host (same id and state dir) finds the mirror and goes on;
* the host was killed, daemon included (the guest dies with it): host B, connected to both
  repositories, finishes. Before "switch requested" the source is what the guest wrote; from
  "switch requested" to "switched" the finisher decides by content
  (replica_files.settle); after "switched" it only removes the source.

Each test first checks that the daemon is in the state the point names (the mirror job's
status, the export's node). Either way every write acknowledged before the kill must read back
from the image in r2, and check + fix must leave no temporary file of a dead attempt behind.
Every host process is killed and every daemon stopped at the end, whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.aggregates.image import Image
from engine.aggregates.operations import split_ref
from engine.executors import crashpoints as cp
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.service.attachments import export_name, volume_of
from tests.facade.images import MiB
from tests.hosts.hostlib import Auditor, HostProcess, events, host_spec, settle, temporaries
from tests.vm import GuestWriter, qemu_io

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-io") is None,
    reason="qemu-storage-daemon and qemu-io are not installed (Debian: qemu-system-common, "
    "qemu-utils)",
)

# Where the guest writes: above what the disk held before the migration (patterns 7 and 9).
WRITES_AT, WRITES_LENGTH = 48 * MiB, 8 * MiB
# The states in which the source is still what the guest wrote (no "switch requested" yet).
BEFORE_REQUEST = (
    cp.MIGRATION_AFTER_CLONE,
    cp.MIGRATION_MID_SYNC,
    cp.MIGRATION_AFTER_SYNC,
    cp.MIGRATION_MIRRORING,
)
# "switch requested" is recorded; whether QEMU switched only the dead daemon knew.
IN_SWITCH = (
    cp.MIGRATION_BEFORE_COMPLETE,
    cp.MIGRATION_AFTER_COMPLETE,
    cp.MIGRATION_BEFORE_SWITCHED,
)
SWITCHED = (cp.MIGRATION_AFTER_SWITCHED,)


def test_every_state_of_a_migration_is_tried() -> None:
    assert BEFORE_REQUEST + IN_SWITCH + SWITCHED == cp.MIGRATION_NAMES


@pytest.fixture
def hosts() -> Iterator[Callable[..., HostProcess]]:
    """``hosts(spec, crash_at=...)``: a host process, killed at the end if still running."""
    started: list[HostProcess] = []

    def start(spec: dict[str, object], crash_at: str | None = None) -> HostProcess:
        started.append(HostProcess(spec, crash_at=crash_at))
        return started[-1]

    try:
        yield start
    finally:
        for host in started:
            host.kill()


@pytest.fixture
def repos(repo_paths: tuple[str, str]) -> dict[str, str]:
    return {"r1": repo_paths[0], "r2": repo_paths[1]}


def attached_disk(repos: dict[str, str], state_dir: str) -> tuple[str, str]:
    """On host-a (closed again, its daemon serving on): r1 and r2 formatted, and an attached
    64 MiB disk of r1 whose base holds 16 MiB of pattern 7 and whose top 8 MiB of pattern 9
    after it. Returns the disk and its URI."""
    with StorageEngine("host-a", state_dir=state_dir, lease_timeout=1.0) as se:
        for name, path in repos.items():
            se.create_storage_repository("localfs-1.0", {"path": path})
            se.connect_storage_repository(name, "localfs-1.0", {"path": path})
        disk = se.create_virtual_disk("r1", 64 * MiB)
        se.wait_for_image("r1", disk, timeout=30)
        uri = se.attach_image("r1", disk).nbd_uri
        qemu_io(uri, "raw", "write -P 7 0 16M")
        se.remove_image("r1", se.create_snapshot("r1", disk))
        qemu_io(uri, "raw", "write -P 9 16M 8M")
    return disk, uri


def migrate_and_die(
    hosts: Callable[..., HostProcess],
    repos: dict[str, str],
    state_dir: str,
    disk: str,
    point: str,
) -> None:
    """Host A, in a process of its own, migrates the disk to r2 and dies at ``point``."""
    step = {"call": "migrate_image", "args": ["r1", disk, "r2"], "save": "op"}
    host = hosts(host_spec("host-a", state_dir, repos, steps=[step]), crash_at=point)
    if not host.died_of_sigkill(timeout=120):
        recorded = [(name, f.get("stage"), f.get("phase")) for name, _, f in events(repos["r1"])]
        raise AssertionError(f"host-a did not die at {point}; r1's log ends {recorded[-8:]}")


def image_in(repo: str, disk: str) -> Image:
    """The image as the repository's log says now."""
    auditor = Auditor(repo)
    try:
        auditor.view.catch_up()
        image = auditor.view.image(uuid.UUID(disk))
        assert image is not None
        return image
    finally:
        auditor.close()


def top_path(repo: str, disk: str) -> str:
    """The file of the image's top as the repository's log says now."""
    volume_id, fmt = split_ref(image_in(repo, disk).chain[-1])
    return os.path.join(repo, "volumes", f"{volume_id}.{fmt}")


def daemon_at(point: str, repos: dict[str, str], state_dir: str, disk: str) -> None:
    """The daemon the dead engine left is in the state ``point`` names: the mirror job's
    status, and whether the export serves the replica's top already. While the job runs, its
    target reads the replica's synced volumes below it, linked when the mirror started: it is
    never reopened under the guest's writes (migration_stages._start_mirror)."""
    image = image_in(repos["r1"], disk)

    def replica_node(ref: str) -> str:
        volume_id, fmt = split_ref(ref)
        return volume_of(
            image, ref, os.path.join(repos["r2"], "volumes", f"{volume_id}.{fmt}")
        ).node

    top = image.chain[-1]
    replica_top = replica_node(top)
    daemon = StorageDaemon(state_dir)
    try:
        if point == cp.MIGRATION_AFTER_COMPLETE:  # QEMU switches in its own time
            deadline = time.monotonic() + 30
            while daemon.export_node(export_name(image.id)) != replica_top:
                assert time.monotonic() < deadline, "QEMU never switched"
                time.sleep(0.05)
        statuses = [job.status for job in daemon.query_jobs()]
        on_replica = daemon.export_node(export_name(image.id)) == replica_top
        linked = daemon.backing_chain(replica_top)[1:] if statuses else None
    finally:
        daemon.close()
    expected: dict[str, tuple[set[str], bool]] = {
        cp.MIGRATION_AFTER_CLONE: (set(), False),
        cp.MIGRATION_MIRRORING: ({"running", "ready"}, False),
        cp.MIGRATION_MID_SYNC: (set(), False),  # migrate_image syncs before it mirrors
        cp.MIGRATION_AFTER_SYNC: (set(), False),
        cp.MIGRATION_BEFORE_COMPLETE: ({"ready"}, False),
        cp.MIGRATION_AFTER_COMPLETE: ({"concluded"}, True),
        cp.MIGRATION_BEFORE_SWITCHED: (set(), True),  # the job dismissed
        cp.MIGRATION_AFTER_SWITCHED: (set(), True),
    }
    jobs, switched = expected[point]
    assert len(statuses) == (1 if jobs else 0) and set(statuses) <= jobs, (point, statuses)
    assert on_replica == switched, point
    if statuses and statuses != ["concluded"]:
        assert linked == [replica_node(ref) for ref in reversed(image.chain[:-1])], linked


def in_flight(writer: GuestWriter) -> tuple[int, int]:
    """(offset, pattern) of the write the writer sent after its last acknowledged one: in
    flight when its virtual machine died, so either it or the one before may be there."""
    n, blocks = len(writer.writes), writer.length // writer.block
    return writer.start + n % blocks * writer.block, 1 + (n // blocks + n % blocks) % 255


def read_back(
    path: str,
    fmt: str,
    patterns: dict[int, int],
    block: int = 64 * 1024,
    unacknowledged: tuple[int, int] | None = None,
) -> None:
    """Every block in ``patterns`` reads its pattern in the image at ``path`` (its chain); the
    block of ``unacknowledged`` (offset, pattern) may read that one instead."""
    assert patterns, "the writer wrote nothing"
    if unacknowledged is not None and unacknowledged[0] in patterns:
        offset, pattern = unacknowledged
        there = first_bytes(path, fmt, [offset]).get(offset)
        assert there in (patterns[offset], pattern), (offset, there, patterns[offset], pattern)
        patterns = {o: p for o, p in patterns.items() if o != offset}
    commands = "".join(f"read -P {p:#04x} {o} {block}\n" for o, p in sorted(patterns.items()))
    result = subprocess.run(
        ["qemu-io", "-r", "-f", fmt, path],
        input=commands + "quit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    reads = output.count(f"read {block}/{block} bytes")
    bad = sorted({int(m) // block * block for m in _MISMATCH.findall(output)})
    if bad or reads != len(patterns):
        found = first_bytes(path, fmt, bad)
        lost = ", ".join(f"{o}: {found.get(o, -1):#04x}, not {patterns[o]:#04x}" for o in bad[:10])
        raise AssertionError(
            f"{path}: {len(bad)} of {len(patterns)} acknowledged writes do not read back "
            f"({lost}); {reads} reads done; output ends {output[-300:]!r}"
        )


_MISMATCH = re.compile(r"Pattern verification failed at offset (\d+)")


def first_bytes(path: str, fmt: str, offsets: list[int]) -> dict[int, int]:
    """The first byte at each offset of the image at ``path``, its chain read as a whole
    (none if it cannot be read so)."""
    with tempfile.TemporaryDirectory(prefix="strata-read-") as scratch:
        raw = Path(scratch) / "image.raw"
        converted = subprocess.run(
            ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(raw)],
            capture_output=True,
            timeout=120,
        )
        if converted.returncode != 0:
            return {}
        with raw.open("rb") as f:
            found = {}
            for offset in offsets:
                f.seek(offset)
                found[offset] = f.read(1)[0]
            return found


def nothing_left(se: StorageEngine, repos: dict[str, str]) -> None:
    """After check and fix (cleans only), no temporary file of a dead attempt is left in
    either repository: a dead sync's lies in the destination, judged by the source's log."""
    for _ in range(4):
        fixes = [(name, fix) for name in repos for fix in se.check_storage_repository(name)]
        if not fixes:
            break
        assert {fix.type for _, fix in fixes} == {"clean"}, fixes
        for name, fix in fixes:
            se.fix_storage_repository(name, fix)
        settle(list(repos.values()))
    else:
        raise AssertionError(f"fixes still offered after four rounds: {fixes}")
    assert [temporaries(path) for path in repos.values()] == [[], []]


def the_data_before(path: str, fmt: str) -> None:
    """What the disk held before the migration reads the same there."""
    qemu_io(path, fmt, "read -P 7 0 16M", "read -P 9 16M 8M", read_only=True)


def moved(repos: dict[str, str], disk: str) -> None:
    """The source's log says the image went to r2; r2's says it is the image there."""
    ended = [f for name, _, f in events(repos["r1"]) if name == "ReplicationEnded"]
    assert [f["outcome"] for f in ended] == ["switched"], ended
    removed = [f for name, _, f in events(repos["r1"]) if name == "ImageRemoved"]
    assert any("migrated to" in str(f.get("reason")) for f in removed), removed
    assert any(name == "ReplicaSwitched" for name, _, _ in events(repos["r2"]))


@pytest.mark.parametrize("point", cp.MIGRATION_NAMES)
def test_engine_killed_while_its_daemon_lives_the_restarted_engine_goes_on(
    point: str,
    repos: dict[str, str],
    state_dir: Callable[[], str],
    hosts: Callable[..., HostProcess],
) -> None:
    directory = state_dir()
    disk, uri = attached_disk(repos, directory)
    with GuestWriter(uri, start=WRITES_AT, length=WRITES_LENGTH, pause=0.005) as writer:
        writer.wait_for_writes(20)
        migrate_and_die(hosts, repos, directory, disk, point)
        daemon_at(point, repos, directory, disk)
        writer.wait_for_writes(len(writer.writes) + 20)  # the daemon serves on
        with StorageEngine(
            "host-a", state_dir=directory, lease_timeout=1.0, poll_interval=0.1
        ) as se:
            for name, path in repos.items():
                se.connect_storage_repository(name, "localfs-1.0", {"path": path})
            status = se.wait_for_image("r2", disk, timeout=120)
            assert status.status == "optimized", status
            assert [(a.image_id, a.repo_id, a.nbd_uri) for a in se.list_attachments()] == [
                (disk, "r2", uri)
            ]
            writer.wait_for_writes(len(writer.writes) + 20)
            writer.stop()
            assert writer.error is None, writer.error
            read_back(uri, "raw", writer.last_patterns())  # through the export, on r2 now
            moved(repos, disk)
            assert disk not in [i.image_id for i in se.list_images("r1")]
            se.detach_image("r2", disk)
            path = se.prepare_image("r2", disk).path
            assert path.startswith(repos["r2"])
            read_back(path, "qcow2", writer.last_patterns())
            the_data_before(path, "qcow2")
            se.teardown_image("r2", disk)
            nothing_left(se, repos)


@pytest.mark.parametrize("point", cp.MIGRATION_NAMES)
def test_host_killed_with_its_daemon_another_host_finishes(
    point: str,
    repos: dict[str, str],
    state_dir: Callable[[], str],
    hosts: Callable[..., HostProcess],
    tmp_path: Path,
) -> None:
    state_a, state_b = state_dir(), state_dir()
    disk, uri = attached_disk(repos, state_a)
    with GuestWriter(uri, start=WRITES_AT, length=WRITES_LENGTH, pause=0.005) as writer:
        writer.wait_for_writes(20)
        migrate_and_die(hosts, repos, state_a, disk, point)
        daemon_at(point, repos, state_a, disk)
        # The daemon outlives the engine a little, as it would a crashed engine's host: once
        # QEMU switched, these writes are only on the replica.
        writer.wait_for_writes(len(writer.writes) + 20)
        pid = StorageDaemon(state_a).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the host is gone, the virtual machine with it
        writer.stop()
    acknowledged, unacknowledged = writer.last_patterns(), in_flight(writer)
    source = tmp_path / "source.raw"
    if point in BEFORE_REQUEST:
        # What the source holds now is the image: the replica's partial top must give way.
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", top_path(repos["r1"], disk), source],
            check=True,
            capture_output=True,
            timeout=120,
        )
    with StorageEngine("host-b", state_dir=state_b, lease_timeout=1.0, poll_interval=0.1) as se:
        for name, path in repos.items():
            se.connect_storage_repository(name, "localfs-1.0", {"path": path})
        status = se.wait_for_image("r2", disk, timeout=120)
        assert status.status == "optimized", status
        moved(repos, disk)
        assert disk not in [i.image_id for i in se.list_images("r1")]
        replica = Auditor(repos["r2"])
        try:
            replica.view.catch_up()
            image = replica.view.image(uuid.UUID(disk))
            assert image is not None and image.attached_on is None  # detached: its host died
        finally:
            replica.close()
        path = se.prepare_image("r2", disk).path
        assert path.startswith(repos["r2"])
        read_back(path, "qcow2", acknowledged, unacknowledged=unacknowledged)
        the_data_before(path, "qcow2")
        if point in BEFORE_REQUEST:
            compared = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, path],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert compared.returncode == 0, compared.stdout + compared.stderr
        se.teardown_image("r2", disk)
        nothing_left(se, repos)
    released = [f for name, _, f in events(repos["r1"]) if name == "AttachmentReleased"]
    if point not in SWITCHED:
        assert [f["of_host"] for f in released] == ["host-a"]
