"""More crash safety of a live storage migration (docs/adr/0029), with real ``kill -9``; the
fixtures and checks are tests/live/test_migration_recovery.py's.

* Host A dies with its daemon while it mirrors; before any host finishes offline, the image is
  attached again on host B, and the migration ends live there: a new mirror from an empty top,
  the guest writing through host B's export sees no error.
* Seed 003's granular order (the mirror started before the sync, its target opened alone): the
  switch cancels that mirror and starts another on the synced chain; the engine killed there
  (its daemon alive) goes on when restarted, and the host killed there with its daemon is
  finished offline by host B.
* An abort (disk_replicate_finish onto the source) racing with a running migrate_image: the
  image stays in r1 with every write, the replica goes, the daemon keeps no job and no node of
  r2, and a later migration works.

Every write acknowledged before a kill, and after it where the guest lives on, reads back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from engine import StorageEngine
from engine.errors import ImageInUse
from engine.executors import crashpoints as cp
from engine.formats.qemu.storage_daemon import StorageDaemon
from engine.service.attachments import export_name
from tests.facade.images import MiB
from tests.hosts.hostlib import HostProcess, events, host_spec
from tests.live.test_migration import open_under
from tests.live.test_migration_recovery import (
    WRITES_AT,
    WRITES_LENGTH,
    attached_disk,
    daemon_at,
    hosts,
    image_in,
    in_flight,
    migrate_and_die,
    moved,
    nothing_left,
    pytestmark,
    read_back,
    repos,
    the_data_before,
)
from tests.vm import GuestWriter

__all__ = ["hosts", "pytestmark", "repos"]  # the fixtures and the skip, shared

# Where the guest writes once attached again on host B: apart from host A's writes.
MORE_AT = 32 * MiB


def test_every_point_only_the_granular_flow_reaches_is_tried() -> None:
    assert (cp.MIGRATION_AFTER_CANCEL,) == cp.MIGRATION_GRANULAR_NAMES
    assert not set(cp.MIGRATION_GRANULAR_NAMES) & set(cp.MIGRATION_NAMES)


def connected(host_id: str, state: str, repos: dict[str, str], **kwargs: Any) -> StorageEngine:
    se = StorageEngine(host_id, state_dir=state, lease_timeout=1.0, poll_interval=0.1, **kwargs)
    for name, path in repos.items():
        se.connect_storage_repository(name, "localfs-1.0", {"path": path})
    return se


def kill_daemon(state: str) -> None:
    """The host is gone, the virtual machine with it."""
    pid = StorageDaemon(state).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def attach_once_released(se: StorageEngine, repo: str, disk: str) -> str:
    """Attach here once the dead host's lease has expired (ImageInUse until then): the attach
    releases its attachment. Returns the NBD address."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return se.attach_image(repo, disk).nbd_uri
        except ImageInUse:
            assert time.monotonic() < deadline, "the dead host's attachment was never released"
            time.sleep(0.1)


def jobs_and_nodes(state: str, path: str) -> tuple[list[str], list[str]]:
    """The daemon's block jobs, and the files under ``path`` its nodes have open."""
    daemon = StorageDaemon(state)
    try:
        jobs = [job.id for job in daemon.query_jobs()]
        nodes = daemon._execute("query-named-block-nodes")
    finally:
        daemon.close()
    files = sorted(
        node["file"] for node in nodes if str(node.get("file", "")).startswith(path + os.sep)
    )
    return jobs, files


def mirrorings(repo: str) -> list[str]:
    """The hosts that started a mirror of the migration recorded in ``repo``'s log, in order."""
    return [
        host
        for name, host, f in events(repo)
        if name == "StageReached" and f.get("phase") == "mirroring"
    ]


# --- attached again on another host ---------------------------------------------------------


def test_attached_again_on_another_host_the_migration_ends_live_there(
    repos: dict[str, str],
    state_dir: Callable[[], str],
    hosts: Callable[..., HostProcess],
) -> None:
    state_a, state_b = state_dir(), state_dir()
    disk, uri = attached_disk(repos, state_a)
    point = cp.MIGRATION_MIRRORING
    with GuestWriter(uri, start=WRITES_AT, length=WRITES_LENGTH, pause=0.005) as writer:
        writer.wait_for_writes(20)
        migrate_and_die(hosts, repos, state_a, disk, point)
        daemon_at(point, repos, state_a, disk)
        writer.wait_for_writes(len(writer.writes) + 20)
        kill_daemon(state_a)
        writer.stop()
    before, unacknowledged = writer.last_patterns(), in_flight(writer)
    # Host B without executors first: nothing finishes the migration offline meanwhile.
    with connected("host-b", state_b, repos, run_executors=False) as se:
        uri_b = attach_once_released(se, "r1", disk)
    assert uri_b != uri and state_b in uri_b, uri_b  # host B's daemon serves it
    with GuestWriter(uri_b, start=MORE_AT, length=WRITES_LENGTH, pause=0.005) as after:
        after.wait_for_writes(20)
        with connected("host-b", state_b, repos) as se:
            status = se.wait_for_image("r2", disk, timeout=120)
            assert status.status == "optimized", status
            served = [(a.image_id, a.repo_id, a.nbd_uri) for a in se.list_attachments()]
            assert served == [(disk, "r2", uri_b)]
            after.wait_for_writes(len(after.writes) + 20)
            after.stop()
            assert after.error is None, after.error
            moved(repos, disk)
            switched = [f for name, _, f in events(repos["r2"]) if name == "ReplicaSwitched"]
            assert [(f["attached"], f["host_id"]) for f in switched] == [(True, "host-b")]
            assert mirrorings(repos["r1"]) == ["host-a", "host-b"]  # a new mirror on host B
            read_back(uri_b, "raw", after.last_patterns())  # through the export, on r2 now
            read_back(uri_b, "raw", before, unacknowledged=unacknowledged)
            se.detach_image("r2", disk)
            path = se.prepare_image("r2", disk).path
            assert path.startswith(repos["r2"])
            read_back(path, "qcow2", after.last_patterns())
            read_back(path, "qcow2", before, unacknowledged=unacknowledged)
            the_data_before(path, "qcow2")
            se.teardown_image("r2", disk)
            nothing_left(se, repos)
    released = [f for name, _, f in events(repos["r1"]) if name == "AttachmentReleased"]
    assert [f["of_host"] for f in released] == ["host-a"]


# --- seed 003's granular order: the switch restarts the mirror ------------------------------


def granular_until_finish(repos: dict[str, str], state: str, disk: str) -> str:
    """On host-a (closed again, its daemon serving on): a live snapshot, the structure cloned,
    the mirror started (its target opened alone), the volumes below synced, the mirror ready:
    all seed 003's flow asks before disk_replicate_finish. Returns the snapshot: it stays in
    r1 once the disk moved (no automatic merge in this flow)."""
    with connected("host-a", state, repos) as se:
        snap = se.create_snapshot("r1", disk)
        se.clone_image_structure("r1", disk, "r2")
        se.wait_for_image("r1", disk, timeout=60)
        se.disk_replicate_start("r1", disk, "r2")
        se.sync_image_data("r1", disk, "r2", "INTERNAL")
        se.wait_for_image("r1", disk, timeout=60)
        deadline = time.monotonic() + 60
        while (job := se.get_block_job("r1", disk)) is None or job.state != "ready":
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
    return snap


def finish_and_die(
    hosts: Callable[..., HostProcess], repos: dict[str, str], state: str, disk: str
) -> None:
    """Host A, in a process of its own, asks for the switch and dies at after-cancel."""
    step = {"call": "disk_replicate_finish", "args": ["r1", disk, "r2"]}
    host = hosts(
        host_spec("host-a", state, repos, steps=[step]), crash_at=cp.MIGRATION_AFTER_CANCEL
    )
    if not host.died_of_sigkill(timeout=120):
        raise AssertionError(f"host-a did not die at after-cancel: {host.seen} {host.stderr()}")
    daemon = StorageDaemon(state)
    try:
        # The old mirror cancelled and gone, the export still on the source's top.
        assert daemon.query_jobs() == []
        image = image_in(repos["r1"], disk)
        assert daemon.export_node(export_name(image.id)) is not None
    finally:
        daemon.close()


def test_granular_engine_killed_as_the_switch_restarts_the_mirror_goes_on(
    repos: dict[str, str],
    state_dir: Callable[[], str],
    hosts: Callable[..., HostProcess],
) -> None:
    state = state_dir()
    disk, uri = attached_disk(repos, state)
    with GuestWriter(uri, start=WRITES_AT, length=WRITES_LENGTH, pause=0.005) as writer:
        writer.wait_for_writes(20)
        snap = granular_until_finish(repos, state, disk)
        finish_and_die(hosts, repos, state, disk)
        writer.wait_for_writes(len(writer.writes) + 20)  # the daemon serves on
        with connected("host-a", state, repos) as se:
            status = se.wait_for_image("r2", disk, timeout=120)
            assert status.status == "optimized", status
            served = [(a.image_id, a.repo_id, a.nbd_uri) for a in se.list_attachments()]
            assert served == [(disk, "r2", uri)]
            writer.wait_for_writes(len(writer.writes) + 20)
            writer.stop()
            assert writer.error is None, writer.error
            read_back(uri, "raw", writer.last_patterns())
            moved(repos, disk)
            # disk_replicate_start's mirror, then the restarted engine's on the synced chain.
            assert mirrorings(repos["r1"]) == ["host-a", "host-a"]
            se.detach_image("r2", disk)
            path = se.prepare_image("r2", disk).path
            assert path.startswith(repos["r2"])
            read_back(path, "qcow2", writer.last_patterns())
            the_data_before(path, "qcow2")
            se.teardown_image("r2", disk)
            se.remove_image("r1", snap)
            nothing_left(se, repos)


def test_granular_host_killed_as_the_switch_restarts_the_mirror_another_host_finishes(
    repos: dict[str, str],
    state_dir: Callable[[], str],
    hosts: Callable[..., HostProcess],
) -> None:
    state_a, state_b = state_dir(), state_dir()
    disk, uri = attached_disk(repos, state_a)
    with GuestWriter(uri, start=WRITES_AT, length=WRITES_LENGTH, pause=0.005) as writer:
        writer.wait_for_writes(20)
        snap = granular_until_finish(repos, state_a, disk)
        finish_and_die(hosts, repos, state_a, disk)
        writer.wait_for_writes(len(writer.writes) + 20)
        kill_daemon(state_a)
        writer.stop()
    acknowledged, unacknowledged = writer.last_patterns(), in_flight(writer)
    with connected("host-b", state_b, repos) as se:
        status = se.wait_for_image("r2", disk, timeout=120)
        assert status.status == "optimized", status
        moved(repos, disk)
        assert mirrorings(repos["r1"]) == ["host-a"]  # host B copied the top offline
        assert image_in(repos["r2"], disk).attached_on is None  # its host died
        path = se.prepare_image("r2", disk).path
        assert path.startswith(repos["r2"])
        read_back(path, "qcow2", acknowledged, unacknowledged=unacknowledged)
        the_data_before(path, "qcow2")
        se.teardown_image("r2", disk)
        se.remove_image("r1", snap)
        nothing_left(se, repos)


# --- an abort racing with migrate_image -----------------------------------------------------


def reached(repo: str, moment: str) -> bool:
    """Whether the migration recorded in ``repo``'s log is at ``moment``."""
    if moment == "at once":
        return True
    found = events(repo)
    if moment == "cloned":  # the create (live snapshot) and the clone completed
        names = [name for name, _, _ in found]
        after = names[names.index("ReplicationStarted") :] if "ReplicationStarted" in names else []
        return after.count("StageCompleted") >= 2
    return any(name == "StageReached" and f.get("phase") == moment for name, _, f in found)


@pytest.mark.parametrize("moment", ["at once", "cloned", "mirroring"])
def test_an_abort_racing_with_a_migration_leaves_the_disk_on_the_source(
    moment: str,
    repos: dict[str, str],
    state_dir: Callable[[], str],
) -> None:
    state = state_dir()
    disk, uri = attached_disk(repos, state)
    with GuestWriter(uri, start=WRITES_AT, length=WRITES_LENGTH, pause=0.005) as writer:
        writer.wait_for_writes(20)
        with connected("host-a", state, repos) as se:
            se.migrate_image("r1", disk, "r2")
            deadline = time.monotonic() + 60
            while not reached(repos["r1"], moment):
                assert time.monotonic() < deadline, moment
                time.sleep(0.005)
            se.disk_replicate_finish("r1", disk, "r1")
            writer.wait_for_writes(len(writer.writes) + 20)
            assert se.wait_for_image("r1", disk, timeout=60).status == "optimized"
            served = [(a.image_id, a.repo_id, a.nbd_uri) for a in se.list_attachments()]
            assert served == [(disk, "r1", uri)]
            assert disk not in [i.image_id for i in se.list_images("r2")]
            ended = [
                f["outcome"] for name, _, f in events(repos["r1"]) if name == "ReplicationEnded"
            ]
            assert ended == ["aborted"], ended
            assert [name for name, _, _ in events(repos["r2"])][-1] == "ImageRemoved"
            # The executor that ran the migration stops in its own time, closing what it
            # opened of r2.
            while left := open_under(state, repos["r2"]):
                assert time.monotonic() < deadline, left
                time.sleep(0.1)
        writer.wait_for_writes(len(writer.writes) + 20)
        writer.stop()
        assert writer.error is None, writer.error
    # Asked with the engine closed: the daemon takes one monitor connection at a time.
    assert jobs_and_nodes(state, repos["r2"]) == ([], [])
    read_back(uri, "raw", writer.last_patterns())  # served from r1 still
    the_data_before(uri, "raw")
    with GuestWriter(uri, start=MORE_AT, length=WRITES_LENGTH, pause=0.005) as after:
        after.wait_for_writes(20)
        with connected("host-a", state, repos) as se:
            se.migrate_image("r1", disk, "r2")  # over the discarded replica
            assert se.wait_for_image("r2", disk, timeout=120).status == "optimized"
            served = [(a.image_id, a.repo_id, a.nbd_uri) for a in se.list_attachments()]
            assert served == [(disk, "r2", uri)]
            after.wait_for_writes(len(after.writes) + 20)
            after.stop()
            assert after.error is None, after.error
            moved_again = [
                f["outcome"] for name, _, f in events(repos["r1"]) if name == "ReplicationEnded"
            ]
            assert moved_again == ["aborted", "switched"], moved_again
            read_back(uri, "raw", after.last_patterns())
            read_back(uri, "raw", writer.last_patterns())
            se.detach_image("r2", disk)
            path = se.prepare_image("r2", disk).path
            assert path.startswith(repos["r2"])
            read_back(path, "qcow2", after.last_patterns())
            read_back(path, "qcow2", writer.last_patterns())
            the_data_before(path, "qcow2")
            se.teardown_image("r2", disk)
            nothing_left(se, repos)
