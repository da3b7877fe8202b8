"""Heartbeats on the shared storage: when a host counts as dead, and who may hold a host id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import HostIdInUse
from engine.executors.liveness import (
    RECORD_SIZE,
    Heartbeat,
    HostLease,
    HostMonitor,
    heartbeats,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease(root: Path, host: str = "host-a", *, runs_executors: bool = True) -> HostLease:
    # A long lease_timeout: its own thread does not renew during a test; the test does.
    return HostLease(
        str(root), host, 3600.0, runs_executors=runs_executors, clock=Clock()
    ).acquire()


def test_a_host_counts_dead_only_once_its_heartbeat_stayed_unchanged_for_the_lease_timeout(
    tmp_path: Path,
) -> None:
    a = lease(tmp_path)
    clock = Clock()
    monitor = HostMonitor(str(tmp_path), 10.0, clock=clock)
    try:
        assert not monitor.is_dead("host-a")
        clock.now += 9.9
        assert not monitor.is_dead("host-a")
        a.renew()
        clock.now += 1.5  # records are read again every lease_timeout / 8 at most
        assert not monitor.is_dead("host-a")  # the renewal is seen at 11.4 s: a new count
        clock.now += 9.9
        assert not monitor.is_dead("host-a")
        clock.now += 0.1
        assert monitor.is_dead("host-a")
        assert monitor.may_take_over("host-a")
    finally:
        a.release()


def test_a_host_that_disconnected_cleanly_counts_dead_at_once(tmp_path: Path) -> None:
    lease(tmp_path).release()
    monitor = HostMonitor(str(tmp_path), 10.0, clock=Clock())

    assert monitor.is_dead("host-a")
    beat = monitor.heartbeat("host-a")
    assert beat is not None and beat.released and beat.pid == os.getpid()


def test_a_live_host_without_executors_releases_its_claims_but_is_not_dead(
    tmp_path: Path,
) -> None:
    a = lease(tmp_path, runs_executors=False)
    monitor = HostMonitor(str(tmp_path), 10.0, clock=Clock())
    try:
        assert not monitor.is_dead("host-a")
        assert monitor.may_take_over("host-a")
    finally:
        a.release()


def test_a_host_never_seen_counts_dead_after_the_lease_timeout_too(tmp_path: Path) -> None:
    clock = Clock()
    monitor = HostMonitor(str(tmp_path), 10.0, clock=clock)

    assert not monitor.is_dead("old-host")  # maybe a host of a version without heartbeats
    clock.now += 10.0
    assert monitor.is_dead("old-host")


def test_a_torn_record_is_neither_a_renewal_nor_a_death(tmp_path: Path) -> None:
    a = lease(tmp_path)
    clock = Clock()
    monitor = HostMonitor(str(tmp_path), 10.0, clock=clock)
    try:
        seen = monitor.heartbeat("host-a")
        with open(a.path, "r+b") as f:
            f.write(b'{"crc": 1, "heartbeat": {"counter": 99')  # a write cut short
        clock.now += 5.0
        assert monitor.heartbeat("host-a") == seen
        clock.now += 5.0
        assert monitor.is_dead("host-a")
        assert Heartbeat.decode(b"\0" * RECORD_SIZE) is None
    finally:
        a.release()


def test_a_second_holder_of_a_host_id_is_refused_and_the_first_can_still_renew(
    tmp_path: Path,
) -> None:
    a = lease(tmp_path)
    try:
        with pytest.raises(HostIdInUse, match=f"pid {os.getpid()}") as refused:
            lease(tmp_path)
        assert refused.value.code == "host_id_in_use"
        a.renew()
        assert a.last_error is None
        lease(tmp_path, host="host-b").release()  # other ids are free
    finally:
        a.release()
    lease(tmp_path).release()  # released: the id can be taken again


def test_a_host_id_held_by_a_process_killed_with_sigkill_is_free_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from engine.executors.liveness import HostLease; "
            f"HostLease({str(tmp_path)!r}, 'host-a', 3600.0).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(HostIdInUse):
            lease(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    lease(tmp_path).release()


def test_a_lease_that_went_unrenewed_for_the_lease_timeout_starts_a_new_term(
    tmp_path: Path,
) -> None:
    clock = Clock()
    a = HostLease(str(tmp_path), "host-a", 10.0, clock=clock).acquire()
    try:
        term = a.term()
        assert a.fresh()
        clock.now += 9.0  # as if the process had been stopped: no renewal for 9 s
        assert a.term() == term
        assert a.fresh()  # it renews at once, since the last renewal was old
        clock.now += 10.0
        assert a.term() == term + 1  # seen at once, before any renewal: maybe counted dead
        assert a.term() == term + 1
        a.renew()
        assert a.fresh() and a.term() == term + 1
    finally:
        a.release()


def test_the_heartbeats_of_a_repository_are_read_once_for_tools(tmp_path: Path) -> None:
    """``heartbeats`` (what ``strata-log hosts`` reads): every host file and its record, None
    for one that is not a regular file (a FIFO would block a reader), dot files left out."""
    assert heartbeats(str(tmp_path)) == {}  # no hosts/ directory yet
    lease(tmp_path).release()
    os.mkfifo(tmp_path / "hosts" / "host-b")
    (tmp_path / "hosts" / ".host-c.tmp").write_bytes(b"")
    beats = heartbeats(str(tmp_path))
    assert list(beats) == ["host-a", "host-b"]
    beat = beats["host-a"]
    assert beat is not None and beat.released and beat.pid == os.getpid()
    assert beats["host-b"] is None
