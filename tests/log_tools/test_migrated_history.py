"""``strata-log history`` of a migrated image (docs/adr/0029): its whole life, read from the
logs of every repository it went through and merged by time, each event with its repository and
its sentence; ``--this-log-only`` for one log; a repository gone is a note."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from engine import StorageEngine
from log_tools import history, migrations
from tests.log_tools.cli import Story, strata_log

MiB = 2**20


@dataclass(frozen=True)
class Migrated:
    roots: dict[str, str]  # repository id -> its root
    disk: str
    ops: list[str]  # the migrations' operation ids, in order

    @property
    def r1(self) -> str:
        return self.roots["r1"]

    @property
    def r2(self) -> str:
        return self.roots["r2"]

    @property
    def r3(self) -> str:
        return self.roots["r3"]


def migrate(state_dir: Callable[[], str], *route: str) -> Migrated:
    """A detached disk made in ``route[0]`` and migrated along the route (``"r1", "r2", "r1"``:
    there and back), the removed copy cleaned out of each repository before it comes back."""
    base = state_dir()  # short paths; removed at the end like the engine's own
    roots = {repo_id: os.path.join(base, repo_id) for repo_id in dict.fromkeys(route)}
    ops: list[str] = []
    with StorageEngine("host-a", state_dir=state_dir(), poll_interval=0.1) as se:
        for repo_id, root in roots.items():
            os.mkdir(root)
            se.create_storage_repository("localfs-1.0", {"path": root})
            se.connect_storage_repository(repo_id, "localfs-1.0", {"path": root})
        disk = se.create_virtual_disk(route[0], MiB)
        se.wait_for_image(route[0], disk, timeout=30)
        for src, dst in itertools.pairwise(route):
            clean(se, dst)
            ops.append(se.migrate_image(src, disk, dst))
            status = se.wait_for_image(dst, disk, timeout=60)
            assert (status.status, status.last_error) == ("optimized", None)
    return Migrated(roots, disk, ops)


def clean(se: StorageEngine, repo_id: str) -> None:
    """Remove the volumes an image migrated away left: a replica cannot come over them."""
    for _ in range(50):
        fixes = [f for f in se.check_storage_repository(repo_id) if f.type == "clean"]
        if not fixes:
            return
        for fix in fixes:
            se.fix_storage_repository(repo_id, fix)
        time.sleep(0.2)
    raise AssertionError(f"clean fixes kept coming in {repo_id}")


@pytest.fixture
def there(state_dir: Callable[[], str]) -> Migrated:
    return migrate(state_dir, "r1", "r2")


def text(*args: str) -> list[str]:
    done = strata_log("history", *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def entries(*args: str) -> list[dict[str, Any]]:
    done = strata_log("history", *args, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def events(lines: list[str]) -> list[tuple[str, int, str, str, str]]:
    """Each event line as (repository, seq, time, event, what it says), the repository '' when
    the lines have none; the changes under an event left out."""
    said = []
    for line in lines:
        if line.split()[0].endswith(":"):
            continue  # "status: 'broken' -> 'optimized'": a change the event made
        if line.split()[0].isdigit():
            line = f"- {line}"
        repository, seq, moment, _host, _version, event, sentence = line.split(maxsplit=6)
        said.append((repository.strip("-"), int(seq), moment, event, sentence))
    return said


def sentence(said: list[tuple[str, int, str, str, str]], repository: str, event: str) -> str:
    (found,) = [s for r, _, _, e, s in said if (r, e) == (repository, event)]
    return found


def test_history_in_the_destination_tells_both_logs_in_time_order(there: Migrated) -> None:
    said = events(text(there.r2, there.disk))
    assert {r for r, *_ in said} == {there.r1, there.r2}
    assert [moment for _, _, moment, _, _ in said] == sorted(m for _, _, m, _, _ in said)
    for repository in (there.r1, there.r2):  # each log in its own order
        seqs = [seq for r, seq, *_ in said if r == repository]
        assert seqs == sorted(seqs) and len(seqs) > 1
    order = [(r, e) for r, _, _, e, _ in said]
    steps = [
        (there.r1, "ImageRequested"),  # the disk, made in r1
        (there.r2, "ImageRequested"),  # its replica, made first
        (there.r1, "ReplicationStarted"),
        (there.r2, "ReplicaSwitched"),
        (there.r1, "ReplicationEnded"),
        (there.r1, "ImageRemoved"),
    ]
    assert [order.index(step) for step in steps] == sorted(order.index(step) for step in steps)


def test_a_migrations_events_are_sentences_that_name_the_other_repository(
    there: Migrated,
) -> None:
    said = events(text(there.r2, there.disk))
    (op,) = there.ops
    assert sentence(said, there.r2, "ImageRequested") == (
        f"replica of the image in {there.r1}, made by migration {op}"
    )
    assert sentence(said, there.r1, "ReplicationStarted") == f"replication to {there.r2} started"
    assert sentence(said, there.r1, "ReplicationEnded") == (
        f"replication to {there.r2} ended: switched, the image lives there now"
    )
    assert sentence(said, there.r2, "ReplicaSwitched") == (
        f"became the image here, in place of the one in {there.r1}; the source's copy is "
        f"removed next; not attached"
    )
    assert sentence(said, there.r1, "ImageRemoved") == (
        f"migrated to {there.r2}: removed here, it lives there now"
    )
    requested = sentence(said, there.r1, "OperationRequested")
    assert requested == (
        f"block job migrate {op} requested: clone the chain's 1 volume(s) empty into {there.r2}; "
        f"copy 1 immutable volume(s) into {there.r2}; switch to the replica in {there.r2}"
    )


def test_history_in_the_source_is_the_same_whole_life(there: Migrated) -> None:
    assert text(there.r1, there.disk) == text(there.r2, there.disk)
    # Its log directory names the same repositories.
    assert text(os.path.join(there.r1, "log"), there.disk) == text(there.r2, there.disk)


def test_the_json_says_each_events_repository_in_time_order(there: Migrated) -> None:
    merged = entries(there.r1, there.disk)
    assert [e["time_ns"] for e in merged] == sorted(e["time_ns"] for e in merged)
    for repository in (there.r1, there.r2):
        own = [e for e in merged if e["repository"] == repository]
        alone = entries(repository, there.disk, "--this-log-only")
        assert [{k: v for k, v in e.items() if k != "repository"} for e in own] == alone
    assert {e["repository"] for e in merged} == {there.r1, there.r2}
    (replica,) = [
        e for e in merged if e["repository"] == there.r2 and e["event"] == "ImageRequested"
    ]
    assert replica["fields"]["origin"] == {
        "how": "replica", "of": there.r1, "repository": "r1", "op": there.ops[0]
    }  # fmt: skip
    assert entries(there.r2, there.disk) == merged


def test_this_log_only_keeps_to_paths_log(there: Migrated) -> None:
    lines = text(there.r2, there.disk, "--this-log-only")
    assert lines[0].startswith(" ")  # no repository column: the sequence number first
    assert [(r, e) for r, _, _, e, _ in events(lines)] == [
        ("", "ImageRequested"), ("", "ReplicaSwitched")
    ]  # fmt: skip
    assert all("repository" not in e for e in entries(there.r1, there.disk, "--this-log-only"))


def test_a_source_repository_deleted_since_is_a_note(there: Migrated) -> None:
    shutil.rmtree(there.r1)
    done = strata_log("history", there.r2, there.disk)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"strata-log: note: the repository at {there.r1} (named by event 2 of {there.r2}) is "
        f"gone: its part is not shown\n"
    )
    assert done.stdout.splitlines() == text(there.r2, there.disk, "--this-log-only")


def test_a_source_that_is_no_longer_a_repository_is_a_note(there: Migrated) -> None:
    os.unlink(os.path.join(there.r1, "STRATA-REPOSITORY"))
    done = strata_log("history", there.r2, there.disk, "--json")
    assert done.returncode == 0, done.stderr
    assert "is not a repository" in done.stderr and done.stderr.count("\n") == 1
    assert {json.loads(line)["repository"] for line in done.stdout.splitlines()} == {there.r2}


def test_there_and_back_reads_each_log_once(state_dir: Callable[[], str]) -> None:
    back = migrate(state_dir, "r1", "r2", "r1")
    merged = entries(back.r1, back.disk)
    alone = {r: entries(r, back.disk, "--this-log-only") for r in (back.r1, back.r2)}
    assert len(merged) == len(alone[back.r1]) + len(alone[back.r2])
    said = events(text(back.r1, back.disk))
    there_op, back_op = back.ops
    assert sentence(said, back.r1, "ReplicaRenewed") == (
        f"replica of the image in {back.r2}, made by migration {back_op}, over the image of "
        f"this id removed here: it starts over"
    )
    assert sentence(said, back.r2, "ImageRequested").endswith(f"made by migration {there_op}")
    removals = [r for r, _, _, e, _ in said if e == "ImageRemoved"]
    assert removals == [back.r1, back.r2]  # it left r1, then r2 for r1 again
    last = said[-1]
    assert (last[0], last[1], last[3]) == (back.r2, alone[back.r2][-1]["seq"], "ImageRemoved")


def test_a_chain_of_migrations_is_followed_to_its_end_within_a_bound(
    state_dir: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = migrate(state_dir, "r1", "r2", "r3")
    # r1's log names r2 only; r2's names r3.
    assert {e["repository"] for e in entries(chain.r1, chain.disk)} == set(chain.roots.values())
    assert {e["repository"] for e in entries(chain.r3, chain.disk)} == set(chain.roots.values())
    monkeypatch.setattr(migrations, "MAX_REPOSITORIES", 2)
    traced = migrations.trace(chain.r1, chain.disk, history.history)
    assert traced.repositories == [chain.r1, chain.r2]
    (started,) = [e for e in traced.entries if e["event"] == "ReplicationStarted"][1:]
    assert traced.notes == [
        f"the repository at {chain.r3} (named by event {started['seq']} of {chain.r2}) is not "
        f"read: the history stops at 2 repositories"
    ]


def test_an_aborted_migration_is_said_in_both_logs(state_dir: Callable[[], str]) -> None:
    base = state_dir()
    r1, r2 = os.path.join(base, "r1"), os.path.join(base, "r2")
    with StorageEngine("host-a", state_dir=state_dir(), poll_interval=0.1) as se:
        for repo_id, root in (("r1", r1), ("r2", r2)):
            os.mkdir(root)
            se.create_storage_repository("localfs-1.0", {"path": root})
            se.connect_storage_repository(repo_id, "localfs-1.0", {"path": root})
        disk = se.create_virtual_disk("r1", MiB)
        se.wait_for_image("r1", disk, timeout=30)
        se.clone_image_structure("r1", disk, "r2")
        se.wait_for_image("r1", disk, timeout=30)
        se.disk_replicate_finish("r1", disk, "r1")  # to where it is: abort
        se.wait_for_image("r1", disk, timeout=30)
    said = events(text(r1, disk))
    assert {r for r, *_ in said} == {r1, r2}
    assert sentence(said, r1, "ReplicationEnded") == (
        f"replication to {r2} ended: aborted, the image stays here"
    )
    assert sentence(said, r2, "ImageRemoved") == f"reason='its migration from {r1} was aborted'"
    assert [(r, e) for r, _, _, e, _ in said][-2:] == [
        (r1, "ReplicationEnded"), (r2, "ImageRemoved")
    ]  # fmt: skip


def test_roots_a_log_names_are_followed_only_to_repositories(story: Story) -> None:
    """What a log says is read as it is: a root that is not absolute, or not a repository, is
    a note, and the history of PATH's log stays whole."""
    named = [
        {"seq": 7, "time_ns": 1, "event": "ReplicationStarted", "fields": {"target": "r2"}},
        {"seq": 8, "time_ns": 2, "event": "ImageRemoved", "fields": {"reason": "migrated to /"}},
        {"seq": 9, "time_ns": 3, "event": "ReplicaSwitched", "fields": {"source": str(story.repo)}},
    ]
    traced = migrations.trace(str(story.log), str(uuid.uuid4()), lambda log_dir, image: named)
    assert traced.repositories == [str(story.repo)]  # itself, not read again
    assert [{k: v for k, v in e.items() if k != "repository"} for e in traced.entries] == named
    assert traced.notes == [
        f"'r2' (named by event 7 of {story.repo}) is not an absolute path: not followed",
        f"/ (named by event 8 of {story.repo}) is not a repository (no STRATA-REPOSITORY): its "
        f"part is not shown",
    ]


def test_an_attached_replica_switched_says_its_host_and_the_merge_it_queued() -> None:
    merge = {
        "op_id": "abc-merge",
        "purpose": "commit",
        "stages": [{"do": "commit", "volume": "base.qcow2", "top": "new.qcow2"}],
    }
    fields = {"source": "/srv/r1", "attached": True, "operations": [merge]}
    assert history.describe("ReplicaSwitched", fields, "host-a") == (
        "became the image here, in place of the one in /srv/r1; the source's copy is removed "
        "next; attached on host-a: its daemon serves it through the same export; block job "
        "commit abc-merge queued: commit new.qcow2 down into base.qcow2, then the image pivots "
        "onto it"
    )
    switch = {"do": "switch", "target": "/srv/r2", "volume": "new.qcow2"}
    plan = {"op_id": "abc", "purpose": "migrate", "stages": [
        {"do": "mirror", "target": "/srv/r2", "volume": "new.qcow2"},
        {**switch, "merge": ["base.qcow2", "new.qcow2"]},
    ]}  # fmt: skip
    assert history.describe("OperationRequested", {"operation": plan}, "host-a") == (
        "block job migrate abc requested: mirror new.qcow2 into /srv/r2; switch to the replica "
        "in /srv/r2, where new.qcow2 is then merged down into base.qcow2"
    )
