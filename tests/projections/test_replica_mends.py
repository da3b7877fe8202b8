"""What a check offers for a snapshot's lost or rotten volume when other repositories hold copies
of the snapshot (docs/adr/0034): a mend from a replica whose digest matches, else the two
choices, said so; and how starting such a fix checks the replica again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.errors import StaleFix
from engine.projections.check import find_problems
from engine.projections.fix_tokens import decode_fix
from engine.projections.replicas import Replica, ReplicaSearch
from engine.service.fix_handlers import start_fix
from engine.types import Fix
from tests.projections.projection_log import GiB, Repo, new_ref
from tests.projections.test_fix_rules import data, made, of_type, published

DIGEST = "ab" * 32
OTHER = "cd" * 32


def record_digest(repo: Repo, image_id: uuid.UUID, volume: str, digest: str) -> None:
    repo.service.update(
        image_id,
        lambda i: i.record_digest(
            volume=volume,
            size=GiB,
            chunk_size=4 * 2**20,
            chunks=b"",
            digest=digest,
            host_id=repo.host_id,
            now=repo.clock(),
        ),
    )


def record_rot(repo: Repo, image_id: uuid.UUID, volume: str, start: int, end: int) -> None:
    """What a deep check records (docs/adr/0033)."""
    repo.service.update(
        image_id,
        lambda i: i.record_damage(
            volume=volume,
            ranges=[[start, end]],
            detail="sha256 differs",
            host_id=repo.host_id,
            now=repo.clock(),
        ),
    )


def copy_in(other: Repo, snapshot: Image, digest: str, fmt: str = "raw") -> Image:
    """The snapshot's copy in another repository: same id, one volume, its digest recorded."""
    top = new_ref(fmt)
    image = Image.request(
        image_id=snapshot.id,
        kind=ops.SNAPSHOT,
        size=snapshot.size,
        chain=[top],
        user_data=None,
        strategy=ops.SPACE,
        auto_fix=True,
        origin={"how": "copy"},
        operations=[],
        host_id=other.host_id,
        now=other.clock(),
    )
    other.service.add(image)
    record_digest(other, snapshot.id, top, digest)
    return other.get(snapshot.id)


@pytest.fixture
def others(tmp_path: Path) -> Iterator[list[Repo]]:
    repos = [Repo(tmp_path / "r2"), Repo(tmp_path / "r3")]
    yield repos
    for r in repos:
        r.app.close()


def snapshot_with_disk(repo: Repo, levels: int = 1) -> tuple[uuid.UUID, uuid.UUID]:
    """A disk and its latest of ``levels`` snapshots, the snapshot's top digested."""
    disk = repo.disk()
    repo.run(disk)
    for _ in range(levels):
        snap = repo.snapshot(disk)
        repo.run(disk)
    record_digest(repo, snap, repo.get(snap).chain[-1], DIGEST)
    return snap, disk


def search(*replicas: Replica, looked_in: tuple[str, ...] = ()) -> ReplicaSearch:
    return ReplicaSearch.of(replicas, looked_in)


def mends(repo: Repo, replicas: ReplicaSearch, *, lose: str, rot: bool = False) -> list[Fix]:
    view = repo.view()
    files = [f for f in made(view) if rot or f.path != f"/r/volumes/{lose}"]
    return of_type(find_problems(view, files, replicas=replicas).fixes, ops.MEND)


def start(repo: Repo, fix: Fix, replicas: ReplicaSearch) -> bool:
    return start_fix(repo.service, decode_fix(repo.view(), fix, replicas=replicas))


def test_a_missing_snapshot_volume_is_copied_again_from_its_replica(
    repo: Repo, others: list[Repo]
) -> None:
    snap, disk = snapshot_with_disk(repo)
    lost = repo.get(snap).chain[-1]
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))

    (mend,) = mends(repo, search(r2), lose=lost)

    assert mend.image_ids == (str(snap), str(disk))  # the disk above it is mended too
    assert mend.description.startswith(
        f"mend snapshot {snap}: volume {lost} is missing; copy it again from its replica in "
        f"repository r2 (digest {DIGEST[:12]}, no data is lost)"
    )
    [stage] = data(mend)["op"]["stages"]
    assert stage == {
        "do": "copy",
        "source_image": str(snap),
        "source_root": "/srv/r2",
        "volume": lost,
    }
    assert start(repo, mend, search(r2)) is True
    assert start(repo, mend, search(r2)) is False  # twice, or on two hosts: queued once
    op = repo.get(snap).current_operation()
    assert op is not None and op.purpose == ops.MEND


def test_an_overlay_is_made_again_as_the_difference_from_its_sound_backing(
    repo: Repo, others: list[Repo]
) -> None:
    snap, _ = snapshot_with_disk(repo, levels=2)
    base, lost = repo.get(snap).chain
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))

    (mend,) = mends(repo, search(r2), lose=lost)

    [stage] = data(mend)["op"]["stages"]
    assert stage == {
        "do": "diff",
        "source_image": str(snap),
        "source_root": "/srv/r2",
        "base": base,
        "volume": lost,
    }


def test_a_rotten_volume_is_deleted_then_copied_again_and_the_rot_is_gone_after(
    repo: Repo, others: list[Repo]
) -> None:
    snap, _ = snapshot_with_disk(repo)
    rotten = repo.get(snap).chain[-1]
    record_rot(repo, snap, rotten, 2**20, 2 * 2**20)
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))

    (mend,) = mends(repo, search(r2), lose=rotten, rot=True)

    assert f"volume {rotten} is rotten; copy it again from its replica" in mend.description
    stages = data(mend)["op"]["stages"]
    assert [s["do"] for s in stages] == ["delete", "copy"] and stages[0]["volumes"] == [rotten]
    assert start(repo, mend, search(r2)) is True
    repo.run(snap)
    assert mends(repo, search(r2), lose="", rot=True) == []


def test_the_replica_is_the_first_whose_digest_matches(repo: Repo, others: list[Repo]) -> None:
    snap, _ = snapshot_with_disk(repo)
    lost = repo.get(snap).chain[-1]
    wrong = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), OTHER))
    right = Replica("r3", "/srv/r3", copy_in(others[1], repo.get(snap), DIGEST))

    (mend,) = mends(repo, search(wrong, right), lose=lost)

    assert "from its replica in repository r3" in mend.description
    assert data(mend)["op"]["stages"][0]["source_root"] == "/srv/r3"


def test_without_a_replica_the_fix_says_where_it_looked_and_offers_both_choices(
    repo: Repo, others: list[Repo]
) -> None:
    snap, disk = snapshot_with_disk(repo)
    rotten = repo.get(snap).chain[-1]
    record_rot(repo, snap, rotten, 0, 2**20)
    wrong = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), OTHER))

    remove, accept = sorted(
        mends(repo, search(wrong, looked_in=("r2", "r3")), lose=rotten, rot=True),
        key=lambda f: "accept" in f.description,
    )

    said = (
        f"mend snapshot {snap}: volume {rotten} is rotten at bytes 0-1048576; no replica in "
        "any connected repository (looked in r2, r3)"
    )
    assert remove.description.startswith(f"{said}: remove the image (data lost)")
    assert accept.description.startswith(
        f"{said}: accept the loss: recreate the volume empty (zeroes where it held data)"
    )
    assert remove.image_ids == accept.image_ids == (str(snap), str(disk))
    stages = data(accept)["op"]["stages"]
    assert stages[0] == {"do": "delete", "volumes": [rotten]}
    assert stages[1] == {"do": "create", "volume": rotten, "size": GiB}
    assert start(repo, accept, search()) is True
    assert start(repo, accept, search()) is False


def test_the_removal_choice_removes_the_snapshot_once(repo: Repo) -> None:
    snap, _ = snapshot_with_disk(repo)
    lost = repo.get(snap).chain[-1]

    remove, _ = sorted(mends(repo, search(), lose=lost), key=lambda f: "accept" in f.description)

    assert "no replica: no other connected repository" in remove.description
    assert start(repo, remove, search()) is True
    assert repo.get(snap).removed
    assert start(repo, remove, search()) is False


def test_accepting_the_loss_of_an_overlay_recreates_it_over_its_backing(repo: Repo) -> None:
    snap, _ = snapshot_with_disk(repo, levels=2)
    base, lost = repo.get(snap).chain

    _, accept = sorted(mends(repo, search(), lose=lost), key=lambda f: "accept" in f.description)

    assert data(accept)["op"]["stages"][0] == {
        "do": "create",
        "volume": lost,
        "size": GiB,
        "backing": base,
    }


def test_a_snapshot_with_no_digest_recorded_has_no_replica(repo: Repo, others: list[Repo]) -> None:
    disk = repo.disk()
    repo.run(disk)
    snap = repo.snapshot(disk)
    repo.run(disk)
    lost = repo.get(snap).chain[-1]
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))

    fixes = mends(repo, search(r2), lose=lost)

    assert len(fixes) == 2 and all("no replica in any" in f.description for f in fixes)


def test_a_mend_whose_replica_is_gone_or_not_looked_in_is_refused(
    repo: Repo, others: list[Repo]
) -> None:
    snap, _ = snapshot_with_disk(repo)
    lost = repo.get(snap).chain[-1]
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))
    (mend,) = mends(repo, search(r2), lose=lost)
    version = repo.get(snap).version

    with pytest.raises(StaleFix, match="gone"):
        start(repo, mend, search(looked_in=("r2",)))
    with pytest.raises(StaleFix, match="not looked in"):
        start(repo, mend, search(looked_in=("r3",)))
    changed = Replica("r2", "/srv/r2", copy_in(others[1], repo.get(snap), OTHER))
    with pytest.raises(StaleFix, match="changed"):
        start(repo, mend, search(changed))
    assert repo.get(snap).version == version  # nothing written


def test_an_image_with_work_pending_on_the_snapshot_waits(repo: Repo, others: list[Repo]) -> None:
    snap, disk = snapshot_with_disk(repo)
    lost = repo.get(snap).chain[-1]
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))
    (mend,) = mends(repo, search(r2), lose=lost)
    start(repo, mend, search(r2))

    view = repo.view()
    fixes = find_problems(view, published(*repo.get(disk).chain[1:]), replicas=search(r2)).fixes

    assert of_type(fixes, ops.MEND) == []  # the copy is queued: nothing to offer meanwhile


def test_a_volume_whose_structure_is_corrupt_is_damaged_not_rotten(
    repo: Repo, others: list[Repo]
) -> None:
    snap, _ = snapshot_with_disk(repo)
    volume = repo.get(snap).chain[-1]
    repo.service.update(
        snap,
        lambda i: i.record_damage(
            volume=volume,
            ranges=[],
            detail="qemu-img check: 2 corruptions",
            host_id=repo.host_id,
            now=repo.clock(),
        ),
    )
    r2 = Replica("r2", "/srv/r2", copy_in(others[0], repo.get(snap), DIGEST))

    (mend,) = mends(repo, search(r2), lose=volume, rot=True)

    assert f"volume {volume} is damaged; copy it again from its replica" in mend.description
    assert [s["do"] for s in data(mend)["op"]["stages"]] == ["delete", "copy"]
