"""What a check offers in a repository that holds a migration's replica (docs/adr/0029): the
replica's volumes are needed, never lost nor cleaned, and no fix is offered for it; once its
migration is aborted, its files are cleaned like any removed image's."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation
from engine.errors import StaleFix
from engine.projections.check import decode_fix, find_problems
from engine.service.fix_handlers import start_fix
from tests.projections.projection_log import GiB, Repo, new_ref
from tests.projections.test_fix_rules import apply, data, made, of_type, published, temporary

SOURCE = "/srv/source-repository"


def replica(
    repo: Repo, chain: list[str], *, strategy: str = ops.SPACE, image_id: uuid.UUID | None = None
) -> uuid.UUID:
    """A replica as a migration's first append makes it: the source's chain, no work."""
    image = Image.request(
        image_id=image_id or uuid.uuid4(),
        kind=ops.VIRTUAL_DISK,
        size=GiB,
        chain=chain,
        user_data=None,
        strategy=strategy,
        auto_fix=True,
        origin={"how": "replica", "of": SOURCE, "repository": "r1", "op": uuid.uuid4().hex},
        operations=[],
        host_id=repo.host_id,
        now=repo.clock(),
    )
    repo.service.add(image)
    return image.id


def operation(repo: Repo, image_id: uuid.UUID, op_id: str) -> Operation:
    op = repo.get(image_id).operation(op_id)
    assert op is not None
    return op


def discard(repo: Repo, image_id: uuid.UUID) -> None:
    repo.service.update(
        image_id,
        lambda i: i.discard_replica(reason="aborted", host_id=repo.host_id, now=repo.clock()),
    )


def test_a_replica_whose_files_are_not_made_yet_is_neither_lost_nor_offered_a_fix(
    repo: Repo,
) -> None:
    chain = [new_ref(), new_ref()]
    replica(repo, chain)
    view = repo.view()

    for files in ([], published(chain[0]), published(*chain)):
        problems = find_problems(view, files)
        assert problems.lost == frozenset()
        assert problems.fixes == []


def test_a_replica_s_damaged_volume_is_the_migration_s_to_copy_again_not_a_mend(
    repo: Repo,
) -> None:
    chain = [new_ref(), new_ref()]
    replica(repo, chain)
    view = repo.view()

    problems = find_problems(view, published(*chain), damaged={chain[0]: "bad header"})

    assert problems.lost == frozenset() and problems.fixes == []


def test_a_performance_replica_of_several_volumes_is_not_offered_an_optimize(repo: Repo) -> None:
    chain = [new_ref(), new_ref()]
    replica(repo, chain, strategy=ops.PERFORMANCE)
    view = repo.view()

    assert find_problems(view, published(*chain)).fixes == []


def test_the_temporary_files_of_a_migration_into_a_replica_are_never_cleaned(repo: Repo) -> None:
    chain = [new_ref(), new_ref()]
    replica(repo, chain)
    view = repo.view()
    # The source's sync writes them, tagged with the source's operation: unknown here.
    copying = [temporary(ref, f"{uuid.uuid4().hex}-2-e1") for ref in chain]

    assert find_problems(view, [*published(*chain), *copying]).fixes == []


def test_no_merge_goes_through_the_chain_of_a_replica(repo: Repo) -> None:
    """An image migrated back where it was: the replica's chain goes through the top of a
    snapshot removed here since, which a merge would rewrite under the migration."""
    disk = repo.disk()
    repo.run(disk)
    snap = repo.snapshot(disk)
    repo.run(disk)
    base, top = repo.get(snap).chain[-1], new_ref()
    replica(repo, [base, top])
    repo.remove(snap)
    view = repo.view()

    fixes = find_problems(view, made(view)).fixes

    assert of_type(fixes, ops.MERGE) == []


def test_a_shared_volume_missing_is_lost_for_the_image_that_is_not_a_replica(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    snap = repo.snapshot(disk)
    repo.run(disk)
    base = repo.get(snap).chain[-1]
    replica(repo, [base, new_ref()])
    view = repo.view()

    problems = find_problems(view, published(repo.get(disk).chain[-1]))

    assert problems.lost == {base}
    mended = {i for f in of_type(problems.fixes, ops.MEND) for i in f.image_ids}
    assert mended == {str(disk), str(snap)}


def test_an_aborted_replica_s_files_are_cleaned_through_a_new_carrier(repo: Repo) -> None:
    """The discarded replica keeps its ``replica_of``, and takes no work: its files go to a
    carrier of their own, which starts."""
    chain = [new_ref(), new_ref()]
    image_id = replica(repo, chain)
    discard(repo, image_id)
    view = repo.view()

    [clean] = find_problems(view, published(*chain)).fixes

    assert clean.type == ops.CLEAN and clean.image_ids == ()
    assert data(clean)["op"]["stages"] == [{"do": "delete", "volumes": sorted(chain)}]
    assert apply(repo, clean) is True


def test_a_migration_s_temporary_file_is_a_leftover_once_its_attempt_is_over_at_the_source(
    repo: Repo, tmp_path: Path
) -> None:
    """The source's operation, known through ``writers``, says whether the attempt that
    wrote a temporary file into the replica still runs (architecture §5, epochs)."""
    chain = [new_ref(), new_ref()]
    replica(repo, chain)
    source = Repo(tmp_path / "source")
    try:
        work = source.disk()  # its create stands for the migration's stage, as the tag names it
        op_id, stage, epoch = source.claim(work)
        writers = {op_id: operation(source, work, op_id)}
        current = temporary(chain[1], f"{op_id}-{stage}-e{epoch}")
        earlier = temporary(chain[0], f"{op_id}-{stage}-e{epoch - 1}")  # a dead attempt's
        view = repo.view()

        [clean] = find_problems(view, [*published(*chain), current, earlier], writers=writers).fixes
        assert data(clean)["op"]["stages"][0]["temporaries"] == [[chain[0], earlier.tag]]
        with pytest.raises(StaleFix):  # started where the source is not known: not ours
            decode_fix(repo.view(), clean)
        assert start_fix(repo.service, decode_fix(repo.view(), clean, (), writers)) is True

        source.complete(work)  # over: the last attempt's file is a leftover too
        writers = {op_id: operation(source, work, op_id)}
        fixes = find_problems(repo.view(), [*published(*chain), current], writers=writers).fixes
        assert [data(f)["op"]["stages"][0]["temporaries"] for f in fixes] == [
            [[chain[1], current.tag]]
        ]
    finally:
        source.app.close()
