"""What a check offers for each kind of problem, what starting a fix queues, and how a fix that
no longer applies, or was not made by a check, is refused."""

from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import Iterable

import msgpack
import pytest

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.errors import ForeignFile, InvalidParameter, StaleFix
from engine.formats.repository.driver import VolumeFile
from engine.projections.check import decode_fix, find_fixes, find_problems
from engine.projections.fix_tokens import _op_id as op_id
from engine.projections.status import image_status
from engine.projections.view import RepositoryView
from engine.service.fix_handlers import start_fix
from engine.types import Fix
from tests.projections.projection_log import Repo, new_ref

MiB = 2**20


def published(*refs: str) -> list[VolumeFile]:
    files = []
    for ref in refs:
        volume_id, fmt = ops.split_ref(ref)
        files.append(VolumeFile(volume_id, fmt, f"/r/volumes/{ref}", MiB, MiB, False))
    return files


def temporary(ref: str, tag: str = "op-0-e1") -> VolumeFile:
    volume_id, fmt = ops.split_ref(ref)
    return VolumeFile(volume_id, fmt, f"/r/volumes/.tmp-{ref}.{tag}", MiB, MiB, True, tag)


def made(view: RepositoryView) -> list[VolumeFile]:
    """The files a repository holds when every volume that is ready exists."""
    return published(
        *sorted(r for r in view.referenced_volumes(live_only=False) if view.is_ready(r))
    )


def of_type(fixes: Iterable[Fix], kind: str) -> list[Fix]:
    return [f for f in fixes if f.type == kind]


def data(fix: Fix) -> dict:  # type: ignore[type-arg]
    return msgpack.unpackb(base64.b64decode(fix.data))  # type: ignore[no-any-return]


def apply(repo: Repo, fix: Fix) -> bool:
    view = repo.view()
    return start_fix(repo.service, decode_fix(view, fix))


def test_a_healthy_repository_needs_no_fix(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    snap = repo.snapshot(disk)
    clone = repo.disk(base=snap)
    repo.run(disk)
    repo.run(clone)
    view = repo.view()
    problems = find_problems(view, made(view))
    assert problems.fixes == [] and problems.lost == frozenset()


def test_broken_images_are_offered_a_mend_that_resumes_their_operation(repo: Repo) -> None:
    failed, stopped, held = repo.disk(), repo.disk(), repo.disk(auto_fix=False)
    repo.fail(failed, "boom")
    repo.stop(stopped, "overloaded")
    view = repo.view()
    mends = of_type(find_fixes(view, made(view)), ops.MEND)
    assert sorted(m.image_ids for m in mends) == sorted((str(i),) for i in (failed, stopped, held))
    for mend in mends:
        assert apply(repo, mend) is True
        assert apply(repo, mend) is False  # twice, or on two hosts: queued once
    view = repo.view()
    assert of_type(find_fixes(view, made(view)), ops.MEND) == []
    for image_id in (failed, stopped, held):
        repo.run(image_id)
        assert image_status(repo.view().image(image_id), repo.view()).status == "optimized"  # type: ignore[arg-type]


def test_a_held_optimize_is_released_by_an_optimize_fix(repo: Repo) -> None:
    disk = repo.disk(strategy=ops.PERFORMANCE, auto_fix=False)
    repo.request_fix(disk, ops.MEND, repo.get(disk).operations[0].op_id, None)
    repo.run(disk)
    view = repo.view()
    [fix] = find_fixes(view, made(view))
    assert (fix.type, fix.image_ids, data(fix)["release"]) == (
        ops.OPTIMIZE,
        (str(disk),),
        repo.get(disk).operations[1].op_id,
    )
    apply(repo, fix)
    repo.run(disk)
    assert repo.get(disk).chain[0].endswith(".raw")


def test_a_performance_disk_of_overlays_is_offered_one_raw_volume(repo: Repo) -> None:
    disk = repo.disk(strategy=ops.PERFORMANCE)
    repo.run(disk)
    repo.snapshot(disk)
    repo.run(disk)
    view = repo.view()
    [fix] = find_fixes(view, made(view))
    assert fix == find_fixes(view, made(view))[0]  # the same check twice: the same fix
    [stage] = data(fix)["op"]["stages"]
    assert (stage["do"], stage["source_image"], stage["preallocate"]) == ("copy", str(disk), True)
    assert stage["set_chain"] == [stage["volume"]] and stage["volume"].endswith(".raw")
    assert apply(repo, fix) is True and apply(repo, fix) is False
    assert image_status(repo.view().image(disk), repo.view()).status == "degraded"  # type: ignore[arg-type]
    old_chain = repo.get(disk).chain
    repo.run(disk)
    view = repo.view()
    assert image_status(view.image(disk), view).status == "optimized"  # type: ignore[arg-type]
    # The overlay it no longer uses (the snapshot keeps the base) is for a clean.
    [clean] = find_fixes(view, [*made(view), *published(old_chain[-1])])
    assert clean.type == ops.CLEAN
    assert data(clean)["op"]["stages"] == [{"do": "delete", "volumes": [old_chain[-1]]}]


def merge_story(repo: Repo) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    disk = repo.disk()
    repo.run(disk)
    snap = repo.snapshot(disk)
    clone = repo.disk(base=snap)
    repo.run(disk)
    repo.run(clone)
    repo.remove(snap)
    return disk, snap, clone


def test_a_removed_snapshot_s_volume_is_merged_into_every_chain_through_it(repo: Repo) -> None:
    disk, snap, clone = merge_story(repo)
    base = repo.get(snap).chain[-1]
    disk_top, clone_top = repo.get(disk).chain[-1], repo.get(clone).chain[-1]
    view = repo.view()
    [merge] = find_fixes(view, made(view))
    assert merge.type == ops.MERGE
    assert set(merge.image_ids) == {str(disk), str(snap), str(clone)}
    carrier, other = sorted([disk, clone], key=str)
    plan = data(merge)
    assert plan["target"] == str(carrier)
    stages = plan["op"]["stages"]
    assert [(s["do"], s["volume"], s["backing"], s["old_backing"]) for s in stages] == [
        ("rebase", v, None, base) for v in sorted([disk_top, clone_top])
    ]
    assert stages[-1]["drop_volume"] == base
    assert stages[-1]["set_chain"] == [repo.get(carrier).chain[-1]]
    assert stages[-1]["chain_changes"] == {str(other): [repo.get(other).chain[-1]]}

    assert apply(repo, merge) is True
    view = repo.view()
    assert find_fixes(view, made(view)) == []  # the merge is queued: nothing else to offer yet
    repo.run(carrier)
    assert (repo.get(disk).chain, repo.get(clone).chain) == ([disk_top], [clone_top])
    view = repo.view()
    [clean] = find_fixes(view, made(view))
    assert (clean.type, clean.image_ids) == (ops.CLEAN, (str(snap),))
    assert data(clean)["op"]["stages"] == [{"do": "delete", "volumes": [base]}]


def test_a_merge_checked_by_a_strata_that_did_not_name_the_old_backing_still_starts(
    repo: Repo,
) -> None:
    disk, _, clone = merge_story(repo)
    view = repo.view()
    [merge] = find_fixes(view, made(view))
    older = data(merge)
    for stage in older["op"]["stages"]:
        del stage["old_backing"]
    older["op"]["op_id"] = op_id(ops.MERGE, older["target"], older["salt"], older["op"]["stages"])
    encoded = base64.b64encode(msgpack.packb(older, use_bin_type=True)).decode("ascii")

    assert apply(repo, dataclasses.replace(merge, data=encoded)) is True

    carrier = min([disk, clone], key=str)
    assert repo.get(carrier).operations[-1].stages == older["op"]["stages"]


def test_one_merge_at_a_time_on_chains_that_share_volumes(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    older = repo.snapshot(disk)
    repo.run(disk)
    newer = repo.snapshot(disk)
    repo.run(disk)
    a, b, _ = repo.get(disk).chain
    repo.remove(older)
    repo.remove(newer)
    view = repo.view()
    [first] = find_fixes(view, made(view))
    assert data(first)["op"]["stages"][-1]["drop_volume"] == a  # the deepest first
    apply(repo, first)
    view = repo.view()
    assert find_fixes(view, made(view)) == []
    repo.run(disk)
    view = repo.view()
    fixes = find_fixes(view, made(view))
    [second] = of_type(fixes, ops.MERGE)
    assert data(second)["op"]["stages"][-1]["drop_volume"] == b
    assert [data(c)["op"]["stages"][0]["volumes"] for c in of_type(fixes, ops.CLEAN)] == [[a]]


def test_no_merge_is_offered_while_a_chain_through_the_volume_is_in_use(repo: Repo) -> None:
    disk, _, _ = merge_story(repo)
    repo.prepare(disk)
    view = repo.view()
    assert find_fixes(view, made(view)) == []


def test_a_removed_disk_s_files_are_cleaned_by_a_clean_on_that_disk(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    repo.remove(disk)
    [volume] = repo.get(disk).chain
    view = repo.view()
    [clean] = find_fixes(view, [*made(view), temporary(volume)])
    assert (clean.type, clean.image_ids, data(clean)["target"]) == (
        ops.CLEAN,
        (str(disk),),
        str(disk),
    )
    assert data(clean)["op"]["stages"] == [{"do": "delete", "volumes": [volume]}]
    assert apply(repo, clean) is True
    view = repo.view()
    assert find_fixes(view, made(view)) == []  # queued: not offered again
    repo.run(disk)  # the executors run clean work on removed images
    view = repo.view()
    assert find_fixes(view, []) == []  # done, the file is gone: nothing left


def test_files_no_image_knows_are_cleaned_through_a_new_carrier(repo: Repo) -> None:
    stray, leftover = new_ref(), new_ref("raw")
    files = [*published(stray), temporary(leftover)]
    view = repo.view()
    [clean] = find_fixes(view, files)
    plan = decode_fix(view, clean)
    assert (clean.type, clean.image_ids, plan.new_carrier) == (ops.CLEAN, (), True)
    assert plan.operation is not None
    assert plan.operation["stages"] == [{"do": "delete", "volumes": sorted([stray, leftover])}]
    assert apply(repo, clean) is True and apply(repo, clean) is False
    carrier = repo.view().image(plan.target)
    assert carrier is not None and carrier.removed and carrier.chain == []
    assert carrier.current_operation().op_id == plan.op_id  # type: ignore[union-attr]
    assert find_fixes(repo.view(), files) == []


def test_the_files_of_a_removed_image_whose_work_failed_go_to_a_new_carrier(repo: Repo) -> None:
    disk = repo.disk()
    repo.fail(disk, "crashed mid-copy")
    repo.remove(disk)
    [volume] = repo.get(disk).chain
    view = repo.view()
    [clean] = find_fixes(view, [temporary(volume)])
    assert (clean.type, clean.image_ids, data(clean)["new_carrier"]) == (ops.CLEAN, (), True)


def test_volumes_still_needed_are_never_offered_to_clean(repo: Repo) -> None:
    pending = repo.disk()  # its volume is being made: the temporary file is its work
    [being_made] = repo.get(pending).chain
    merge_story(repo)  # the removed snapshot's volume is still used by two disks
    source = repo.disk()
    repo.run(source)
    copy = repo.copied_snapshot()
    repo.service.update(  # a copy that reads a removed image's chain, still to run
        copy,
        lambda i: i.request_fix(
            fix_type=ops.MEND,
            op_id="copy-of-source",
            operation=ops.plan(
                "copy-of-source",
                "copy",
                {"do": "copy", "source_image": str(source), "volume": new_ref()},
            ),
            host_id="host-a",
            now=repo.clock(),
        ),
    )
    repo.remove(source)
    view = repo.view()
    files = [*made(view), temporary(being_made)]
    assert of_type(find_fixes(view, files), ops.CLEAN) == []


def test_a_volume_missing_from_the_storage_is_lost_unless_it_is_still_being_made(
    repo: Repo,
) -> None:
    ready, pending = repo.disk(), repo.disk()
    repo.run(ready)
    view = repo.view()
    problems = find_problems(view, [])
    assert problems.lost == frozenset(repo.get(ready).chain)
    damaged = find_problems(view, made(view), damaged=repo.get(ready).chain)
    assert damaged.lost == frozenset(repo.get(ready).chain)
    assert not set(repo.get(pending).chain) & problems.lost


def test_a_foreign_file_is_lost_never_cleaned_and_its_report_does_nothing(repo: Repo) -> None:
    live, removed = repo.disk(), repo.disk()
    repo.run(live)
    repo.run(removed)
    repo.remove(removed)
    linked = [
        dataclasses.replace(f, foreign="a symbolic link to '/elsewhere'")
        for f in published(*repo.get(live).chain, *repo.get(removed).chain)
    ]
    view = repo.view()

    problems = find_problems(view, linked)

    assert problems.lost == frozenset(repo.get(live).chain)
    assert of_type(problems.fixes, ops.CLEAN) == []
    assert sorted(f.image_ids for f in problems.fixes) == sorted([(str(live),), (str(removed),)])
    work = sorted((str(i.id), i.version) for i in view.images())
    for fix in problems.fixes:
        assert fix.type == ops.MEND and "symbolic link" in fix.description
        with pytest.raises(ForeignFile):
            apply(repo, fix)
    assert sorted((str(i.id), i.version) for i in repo.view().images()) == work  # nothing queued


def test_a_volume_directory_that_cannot_be_listed_is_reported_once(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    unlisted = ForeignFile(path="/r/volumes", what="a symbolic link to '/other/volumes'")

    problems = find_problems(repo.view(), [], unlisted=unlisted)

    assert problems.lost == frozenset(repo.get(disk).chain)
    [report] = problems.fixes
    assert (report.type, report.image_ids) == (ops.MEND, ())
    assert "/r/volumes" in report.description
    with pytest.raises(ForeignFile):
        apply(repo, report)


def test_fix_data_round_trips_and_data_no_check_made_is_refused(repo: Repo) -> None:
    disk = repo.disk()
    repo.fail(disk, "boom")
    view = repo.view()
    [mend] = find_fixes(view, made(view))
    plan = decode_fix(view, mend)
    op = repo.get(disk).current_operation()
    assert op is not None
    assert (plan.type, plan.target, plan.op_id, plan.operation) == (ops.MEND, disk, op.op_id, None)
    assert plan.images == {str(disk): repo.get(disk).version} and not plan.already_queued

    def tampered(**changes: object) -> Fix:
        return dataclasses.replace(mend, **changes)  # type: ignore[arg-type]

    packed = base64.b64encode(msgpack.packb({**data(mend), "v": 99})).decode()
    for bad in (
        tampered(data="not base64!"),
        tampered(data=base64.b64encode(b"\xc1").decode()),
        tampered(data=packed),
        tampered(type=ops.CLEAN),
        "a string",
    ):
        with pytest.raises(InvalidParameter):
            decode_fix(view, bad)  # type: ignore[arg-type]


def test_an_operation_changed_after_the_check_is_refused_as_garbage(repo: Repo) -> None:
    stray = new_ref()
    view = repo.view()
    [clean] = find_fixes(view, published(stray))
    forged = data(clean)
    forged["op"]["stages"][0]["volumes"] = [repo.get(repo.disk()).chain[0]]
    forged_fix = dataclasses.replace(clean, data=base64.b64encode(msgpack.packb(forged)).decode())
    with pytest.raises(InvalidParameter):
        decode_fix(repo.view(), forged_fix)


def test_a_fix_that_no_longer_applies_is_refused_as_stale(repo: Repo) -> None:
    held = repo.disk(auto_fix=False)
    stray = new_ref()
    disk, _, _ = merge_story(repo)
    perf = repo.disk(strategy=ops.PERFORMANCE)
    repo.run(perf, stop_before=ops.OPTIMIZE)
    repo.stop(perf)
    repo.request_fix(perf, ops.OPTIMIZE, repo.get(perf).operations[1].op_id, None)
    repo.run(perf)
    repo.snapshot(perf)
    repo.run(perf)
    view = repo.view()
    fixes = find_fixes(view, [*made(view), *published(stray)])
    assert sorted(f.type for f in fixes) == [ops.CLEAN, ops.MEND, ops.MERGE, ops.OPTIMIZE]

    repo.remove(held)  # a mend of a removed image
    repo.snapshot(disk)  # a chain through the merged volume has work queued
    repo.snapshot(perf)  # the disk to optimize has work queued
    repo.service.add(  # the stray file is some image's volume now
        Image.request(
            image_id=uuid.uuid4(),
            kind=ops.SNAPSHOT,
            size=MiB,
            chain=[stray],
            user_data=None,
            strategy=ops.SPACE,
            auto_fix=True,
            origin={},
            operations=[],
            host_id="host-a",
            now=repo.clock(),
        )
    )
    view = repo.view()
    for fix in fixes:
        with pytest.raises(StaleFix):
            decode_fix(view, fix)
