"""Several hosts on the same repositories: takeover of a dead host's claims, restarts under the
same host id, one live process per host id, and work done without being asked for it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.errors import HostIdInUse
from engine.formats.qemu.image_tools import QemuImg
from tests.hosts.hostlib import (
    HostProcess,
    MiB,
    claims,
    events,
    eventually,
    host_a_copying,
    host_spec,
    records,
    snapshot_with_data,
)

qemu = QemuImg()


def engine(tmp_path: Path, host: str, repos: dict[str, str], **options: float) -> StorageEngine:
    se = StorageEngine(
        host,
        state_dir=str(tmp_path / f"state-{host}"),
        lease_timeout=options.pop("lease_timeout", 1.0),
        poll_interval=0.1,
    )
    for name, path in repos.items():
        se.connect_storage_repository(name, "localfs-1.0", {"path": path})
    return se


@pytest.fixture
def host_b(tmp_path: Path, repos: dict[str, str]) -> Iterator[StorageEngine]:
    with engine(tmp_path, "host-b", repos) as se:
        yield se


def same_content(se: StorageEngine, a: tuple[str, str], b: tuple[str, str]) -> bool:
    pa, pb = se.prepare_image(*a), se.prepare_image(*b)
    try:
        return qemu.compare(pa.path, pb.path, a_fmt=pa.format, b_fmt=pb.format)
    finally:
        se.teardown_image(*a)
        se.teardown_image(*b)


def test_a_claim_of_a_host_killed_mid_copy_is_taken_over_with_a_new_epoch(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    snapshot, a, copy = host_a_copying(tmp_path, repos)

    with engine(tmp_path, "host-b", repos) as b:
        a.kill()
        status = b.wait_for_image("r2", copy, timeout=30)

        assert (status.status, status.host_id) == ("optimized", "host-b")
        assert claims(repos["r2"]) == [("host-a", 1), ("host-b", 2)]
        assert same_content(b, ("r1", snapshot), ("r2", copy))


def test_a_host_restarted_under_its_old_id_after_kill_9_resumes_its_claims_at_once(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    snapshot, a, copy = host_a_copying(tmp_path, repos, lease_timeout=30.0)
    a.kill()
    spec = host_spec("host-a", tmp_path / "a", repos, lease_timeout=30.0)  # A, started again

    restarted_at = time.monotonic()
    again = HostProcess({**spec, "steps": [{"settle": True, "save": "settled"}]})
    again.saved("settled")

    assert time.monotonic() - restarted_at < 15  # not held up by the 30 s lease
    assert claims(repos["r2"]) == [("host-a", 1), ("host-a", 2)]
    assert again.close() == 0
    with engine(tmp_path, "host-c", repos) as se:
        assert se.get_image_status("r2", copy).status == "optimized"
        assert same_content(se, ("r1", snapshot), ("r2", copy))


def test_a_host_restarted_without_executors_lets_the_others_take_its_claims_at_once(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    _, a, copy = host_a_copying(tmp_path, repos, lease_timeout=30.0)
    a.kill()
    spec = host_spec("host-a", tmp_path / "a", repos, lease_timeout=30.0)  # A, started again

    with engine(tmp_path, "host-b", repos, lease_timeout=30.0) as b:
        auditor_a = HostProcess({**spec, "run_executors": False})
        auditor_a.wait_for("holding")
        started = time.monotonic()
        status = b.wait_for_image("r2", copy, timeout=20)

        assert time.monotonic() - started < 10  # not the 30 s a silent host would take
        assert (status.status, status.host_id) == ("optimized", "host-b")
        assert auditor_a.close() == 0


def test_a_second_live_process_with_the_same_host_id_is_refused_with_a_typed_error(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    a = HostProcess(host_spec("host-a", tmp_path / "a", repos))
    a.wait_for("holding")
    before = records(repos["r1"])
    try:
        with (
            StorageEngine("host-a", state_dir=str(tmp_path / "a2")) as twin,
            pytest.raises(HostIdInUse, match="host-a") as refused,
        ):
            twin.connect_storage_repository("r1", "localfs-1.0", {"path": repos["r1"]})
        assert str(a.proc.pid) in str(refused.value)  # it says which process holds the id
        assert records(repos["r1"]) == before
    finally:
        assert a.close() == 0


def test_two_engines_of_one_process_with_the_same_host_id_are_refused(
    tmp_path: Path, repos: dict[str, str]
) -> None:
    with (
        engine(tmp_path, "host-a", {"r1": repos["r1"]}),
        StorageEngine("host-a", state_dir=str(tmp_path / "twin")) as twin,
    ):
        with pytest.raises(HostIdInUse):
            twin.connect_storage_repository("r1", "localfs-1.0", {"path": repos["r1"]})
        twin.connect_storage_repository("r2", "localfs-1.0", {"path": repos["r2"]})  # free


def test_work_requested_on_a_host_that_died_is_done_by_another_without_any_call_on_it(
    tmp_path: Path, repos: dict[str, str], host_b: StorageEngine
) -> None:
    snapshot = snapshot_with_data(tmp_path, repos, 4 * MiB)
    steps = [
        {"call": "create_virtual_disk", "args": ["r1", 4 * MiB], "save": "disk"},
        {"call": "copy_image", "args": ["r2", snapshot], "save": "copy"},
    ]
    a = HostProcess(host_spec("host-a", tmp_path / "a", repos, steps=steps, run_executors=False))
    a.wait_for("holding")
    a.kill()

    # host_b was only connected; the log tells when it did the work, nothing is asked of it
    def done_by_b(repo: str) -> bool:
        return any(n == "StageCompleted" and h == "host-b" for n, h, _ in events(repos[repo]))

    eventually(lambda: done_by_b("r1") and done_by_b("r2"), timeout=20)
    disk = next(m["value"] for m in a.seen if m.get("saved") == "disk")
    assert host_b.get_image_status("r1", disk).host_id == "host-b"
    assert host_b.get_image_status("r2", snapshot).status == "optimized"
