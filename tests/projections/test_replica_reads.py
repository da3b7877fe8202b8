"""Where work reads an image whose id lives in two repositories after a migration (docs/adr/0029):
executors read a replica last, and a source migrated away is needed by nobody's work once the
image reads itself where it lives now."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import Stage
from engine.connections import ConnectedRepository
from engine.host_repositories import HostRepositories
from tests.projections.projection_log import GiB, Repo, new_op_id, new_ref

SOURCE, DESTINATION = "/srv/source", "/srv/destination"


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[tuple[Repo, Repo]]:
    source, destination = Repo(tmp_path / "source"), Repo(tmp_path / "destination")
    yield source, destination
    source.app.close()
    destination.app.close()


def connected(*repos: tuple[str, Repo]) -> HostRepositories:
    """A host's registry over these logs, in this order (only roots and views are read)."""
    registry = HostRepositories()
    for root, repo in repos:
        view = repo.view()
        fake = SimpleNamespace(repo_id=root, storage=SimpleNamespace(root=root), view=view)
        registry._repos[root] = cast(ConnectedRepository, fake)
    return registry


def add(
    repo: Repo,
    image_id: uuid.UUID,
    chain: list[str],
    *,
    kind: str = ops.VIRTUAL_DISK,
    origin: dict[str, str] | None = None,
    stages: list[Stage] | None = None,
) -> None:
    plans = [ops.plan(new_op_id(), ops.OPTIMIZE, *stages)] if stages else []
    repo.service.add(
        Image.request(
            image_id=image_id,
            kind=kind,
            size=GiB,
            chain=chain,
            user_data=None,
            strategy=ops.SPACE,
            auto_fix=True,
            origin=origin or {"how": "blank"},
            operations=plans,
            host_id=repo.host_id,
            now=repo.clock(),
        )
    )


def replica_origin() -> dict[str, str]:
    return {"how": "replica", "of": SOURCE, "repository": "r1", "op": uuid.uuid4().hex}


def test_executors_read_an_image_from_its_source_before_its_replica(
    logs: tuple[Repo, Repo],
) -> None:
    source, destination = logs
    image_id, chain = uuid.uuid4(), [new_ref()]
    add(source, image_id, chain)
    add(destination, image_id, chain, origin=replica_origin())

    for order in ([DESTINATION, SOURCE], [SOURCE, DESTINATION]):
        registry = connected(*((r, source if r == SOURCE else destination) for r in order))
        found = registry.find_for_executor(image_id)
        assert found is not None and found[1].root == SOURCE

    only_the_replica = connected((DESTINATION, destination))
    found = only_the_replica.find_for_executor(image_id)
    assert found is not None and found[0].replica_of == SOURCE  # the last choice, still one


def test_a_source_migrated_away_is_not_needed_by_the_image_reading_itself_where_it_lives(
    logs: tuple[Repo, Repo],
) -> None:
    source, destination = logs
    image_id, chain = uuid.uuid4(), [new_ref(), new_ref()]
    add(source, image_id, chain)
    source.remove(image_id)  # what the switch does to the source's copy
    flat = new_ref("raw")
    optimize: Stage = {
        "do": "copy",
        "source_image": str(image_id),
        "volume": flat,
        "preallocate": True,
        "set_chain": [flat],
    }
    add(destination, image_id, chain, origin=replica_origin(), stages=[optimize])

    registry = connected((SOURCE, source), (DESTINATION, destination))

    assert registry.needed_elsewhere(SOURCE) == set()


def test_a_snapshot_still_being_copied_under_its_id_needs_its_source(
    logs: tuple[Repo, Repo],
) -> None:
    source, destination = logs
    snapshot, volume = uuid.uuid4(), new_ref()
    add(source, snapshot, [volume], kind=ops.SNAPSHOT)
    copy: Stage = {"do": "copy", "source_image": str(snapshot), "volume": volume}
    add(destination, snapshot, [volume], kind=ops.SNAPSHOT, origin={"how": "copy"}, stages=[copy])

    registry = connected((SOURCE, source), (DESTINATION, destination))

    assert registry.needed_elsewhere(SOURCE) == {volume}
