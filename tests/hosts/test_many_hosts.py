"""Four host processes at once on the same two repositories, each creating, snapshotting,
copying and removing images while every host's executors claim whatever stage comes first."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.hosts.hostlib import (
    HostProcess,
    formatted_repositories,
    host_spec,
    log_verifies,
    records,
    settle,
)

HOSTS = 4
ROUNDS = 6


def requested(repo_path: str) -> Counter[str]:
    """How many times the log requested each image id."""
    return Counter(
        str(r.originator_id) for r in records(repo_path) if r.topic.endswith(".ImageRequested")
    )


def test_four_hosts_at_once_end_with_every_image_as_asked_and_agree_on_it(
    tmp_path: Path,
) -> None:
    repos = formatted_repositories(tmp_path)
    hosts = [
        HostProcess(
            host_spec(
                f"host-{n}",
                tmp_path / f"state-{n}",
                repos,
                # Nobody dies here: a lease long enough that a host starved of CPU for a moment
                # on a busy test machine is not taken over (that would be safe, only slower).
                lease_timeout=5.0,
                steps=[{"workload": {"seed": n, "rounds": ROUNDS}, "save": "asked"}],
            )
        )
        for n in range(1, HOSTS + 1)
    ]
    try:
        asked: dict[str, str] = {}
        for host in hosts:
            asked.update(host.saved("asked", timeout=120))
        settle(list(repos.values()))
        reports = []
        for host in hosts:
            host.send("report")
            reports.append(host.wait_for("report")["report"])
    finally:
        exits = [host.close() for host in hosts]

    assert exits == [0] * HOSTS
    assert all(report == reports[0] for report in reports[1:])  # every projection agrees
    for repo, path in repos.items():
        images = reports[0][repo]["images"]
        named = {key.split("/")[1] for key in asked if key.startswith(f"{repo}/")}
        removed = {i for i in named if asked[f"{repo}/{i}"] == "removed"}
        assert set(images) == named - removed  # none lost, none left that was removed
        statuses = {i: v["status"] for i, v in images.items()}
        assert statuses == dict.fromkeys(named - removed, "optimized")
        assert set(requested(path)) == named  # every id requested ...
        assert max(requested(path).values()) == 1  # ... exactly once
        assert log_verifies(path)
    claimers = {
        r.host_id
        for path in repos.values()
        for r in records(path)
        if r.topic.endswith(".StageClaimed")
    }
    assert claimers == {f"host-{n}" for n in range(1, HOSTS + 1)}  # all of them did the work
