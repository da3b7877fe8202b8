"""Each stage kind, run by an executor on real files with the real qemu-img."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import CopyStage
from engine.formats.qemu.image_tools import allocated_bytes
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu, snapshot_with_data

CLUSTER = 64 * 2**10


def data_bytes(path: str) -> int:
    """Bytes of data the qcow2 file itself holds (not its backing chain)."""
    extents = qemu.map(path, fmt="qcow2")
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_blank_disk_is_created_sparse_with_its_virtual_size(repo: Repo, fmt: str) -> None:
    ref = new_volume(fmt)
    disk = repo.request({"do": "create", "volume": ref, "size": 256 * MiB}, chain=[ref])

    assert repo.executor().run_once() == 1

    assert qemu.info(repo.path(ref), fmt=fmt)["virtual-size"] == 256 * MiB
    assert allocated_bytes(repo.path(ref)) < MiB
    assert repo.service.get(disk).operations[0].state == ops.DONE
    assert repo.topics(disk) == ["ImageRequested", "StageClaimed", "StageCompleted"]
    assert repo.temporaries() == []


def test_a_preallocated_raw_disk_has_all_its_blocks_reserved(repo: Repo) -> None:
    ref = new_volume("raw")
    repo.request({"do": "create", "volume": ref, "size": 8 * MiB, "preallocate": True}, chain=[ref])

    repo.executor().run_once()

    assert allocated_bytes(repo.path(ref)) >= 8 * MiB


def test_an_overlay_on_a_snapshot_volume_reads_its_data_through_a_relative_backing(
    repo: Repo,
) -> None:
    _, base = snapshot_with_data(repo)
    top = new_volume("qcow2")
    repo.request(
        {"do": "create", "volume": top, "size": 4 * MiB, "backing": base}, chain=[base, top]
    )

    repo.executor().run_once()

    info = qemu.info(repo.path(top), fmt="qcow2")
    assert info["backing-filename"] == base  # relative: the repository can move
    assert qemu.read_pattern_matches(repo.path(top), "qcow2", 0, MiB, 0x5A)
    assert data_bytes(repo.path(top)) == 0


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_copy_reads_the_same_as_its_source_chain_and_its_progress_is_in_the_log(
    repo: Repo, fmt: str
) -> None:
    base, top = new_volume("qcow2"), new_volume("qcow2")
    qemu.create(repo.path(base), "qcow2", 64 * MiB)
    qemu.write_pattern(repo.path(base), "qcow2", 0, 32 * MiB, 0x33)
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(top), "qcow2", 40 * MiB, 16 * MiB, 0x44)
    source = repo.request(chain=[base, top], size=64 * MiB, kind=ops.SNAPSHOT)
    copy = new_volume(fmt)
    stage: CopyStage = {
        "do": "copy", "source_image": str(source), "volume": copy, "preallocate": True
    }  # fmt: skip
    image = repo.request(stage, chain=[copy], size=64 * MiB)

    repo.executor().run_once()

    assert qemu.compare(repo.path(top), repo.path(copy), a_fmt="qcow2", b_fmt=fmt)
    assert "backing-filename" not in qemu.info(repo.path(copy), fmt=fmt)
    # A copy's progress is its checkpoints (docs/adr/0032): one a chunk, 1 MiB here.
    assert repo.topics(image).count("StageCheckpointed") == 64
    assert repo.topics(image)[-1] == "StageCompleted"
    if fmt == "raw":
        assert allocated_bytes(repo.path(copy)) >= 64 * MiB  # preallocated


def page_cached_bytes(path: str) -> int:
    """Bytes of the file that sit in the page cache now (util-linux's fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_copy_is_written_around_the_page_cache(repo: Repo, fmt: str) -> None:
    source, volume = snapshot_with_data(repo, size=32 * MiB)
    qemu.write_pattern(repo.path(volume), "qcow2", MiB, 15 * MiB, 0x77)
    copy = new_volume(fmt)
    repo.request({"do": "copy", "source_image": str(source), "volume": copy}, chain=[copy])

    repo.executor().run_once()

    # Written with O_DIRECT: nothing was left dirty for publish's fsync to write back, and the
    # copy did not push other files (a running guest's) out of the cache. qemu-img creates the
    # image's first clusters through the cache before it reopens it direct.
    assert page_cached_bytes(repo.path(copy)) < MiB
    assert qemu.compare(repo.path(volume), repo.path(copy), a_fmt="qcow2", b_fmt=fmt)


def test_an_incremental_copy_reads_as_its_source_and_holds_only_the_changed_clusters(
    repo: Repo, repo2: Repo
) -> None:
    snapshot, shared = snapshot_with_data(repo, size=8 * MiB, pattern=0x11)
    overlay = new_volume("qcow2")
    qemu.create(repo.path(overlay), "qcow2", None, backing=shared, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(overlay), "qcow2", 1 * MiB, CLUSTER, 0x22)
    qemu.write_pattern(repo.path(overlay), "qcow2", 5 * MiB, CLUSTER, 0x22)
    disk = repo.request(chain=[shared, overlay], size=8 * MiB)
    # The backup repository already holds a full copy of the snapshot: the base.
    base = new_volume("qcow2")
    repo2.request(
        {"do": "copy", "source_image": str(snapshot), "volume": base}, chain=[base], size=8 * MiB
    )
    diff = new_volume("qcow2")
    repo2.request(
        {"do": "diff", "source_image": str(disk), "base": base, "volume": diff},
        chain=[base, diff],
        size=8 * MiB,
    )

    assert repo2.executor().run_once() == 2

    assert qemu.compare(repo.path(overlay), repo2.path(diff), a_fmt="qcow2", b_fmt="qcow2")
    assert qemu.info(repo2.path(diff), fmt="qcow2")["backing-filename"] == base
    assert data_bytes(repo2.path(diff)) == 2 * CLUSTER


def three_volume_chain(repo: Repo) -> tuple[str, str, str]:
    """qcow2 volumes base <- middle <- top, each with a MiB of its own data at its own offset."""
    chain = (new_volume("qcow2"), new_volume("qcow2"), new_volume("qcow2"))
    backing = None
    for i, volume in enumerate(chain):
        size = 4 * MiB if backing is None else None
        fmt = None if backing is None else "qcow2"
        qemu.create(repo.path(volume), "qcow2", size, backing=backing, backing_fmt=fmt)
        qemu.write_pattern(repo.path(volume), "qcow2", i * MiB, MiB, (0xA1, 0xB2, 0xC3)[i])
        backing = volume
    return chain


def test_a_rebase_keeps_the_content_whether_it_drops_a_middle_volume_or_flattens(
    repo: Repo, tmp_path: Path
) -> None:
    base, middle, top = three_volume_chain(repo)
    before = str(tmp_path / "before.raw")
    qemu.convert(repo.path(top), before, src_fmt="qcow2", dst_fmt="raw")
    disk = repo.request(
        {"do": "rebase", "volume": top, "backing": base, "set_chain": [base, top]},
        {"do": "rebase", "volume": top, "backing": base},  # again: nothing left to do
        chain=[base, middle, top],
    )

    repo.executor().run_once()

    assert repo.service.get(disk).chain == [base, top]
    assert qemu.info(repo.path(top), fmt="qcow2")["backing-filename"] == base
    assert qemu.compare(repo.path(top), before, a_fmt="qcow2", b_fmt="raw")

    repo.service.update(
        disk,
        lambda i: i.request_fix(
            fix_type=ops.OPTIMIZE,
            op_id="flatten",
            operation=ops.plan(
                "flatten", ops.OPTIMIZE, {"do": "rebase", "volume": top, "set_chain": [top]}
            ),
            host_id="host-a",
            now=repo.service.now(),
        ),
    )
    repo.executor().run_once()

    assert repo.service.get(disk).chain == [top]
    assert "backing-filename" not in qemu.info(repo.path(top), fmt="qcow2")
    assert qemu.compare(repo.path(top), before, a_fmt="qcow2", b_fmt="raw")


def test_a_resize_grows_the_volume(repo: Repo) -> None:
    ref = new_volume("qcow2")
    repo.request(
        {"do": "create", "volume": ref, "size": 4 * MiB},
        {"do": "resize", "volume": ref, "size": 12 * MiB},
        chain=[ref],
    )

    assert repo.executor().run_once() == 2

    assert qemu.info(repo.path(ref), fmt="qcow2")["virtual-size"] == 12 * MiB


def test_a_delete_removes_its_volumes_and_any_temporary_file_becoming_one(repo: Repo) -> None:
    gone, there, never = new_volume("qcow2"), new_volume("raw"), new_volume("qcow2")
    qemu.create(repo.path(gone), "qcow2", MiB)
    qemu.create(repo.path(there), "raw", MiB)
    leftover = repo.storage.temp_path(never.split(".")[0], "qcow2", "crashed-0-e1")
    qemu.create(leftover, "qcow2", MiB)
    os.unlink(repo.path(gone))  # a first attempt removed it already
    image = repo.request(
        {"do": "delete", "volumes": [gone, there, never]}, chain=[], purpose=ops.CLEAN
    )

    repo.executor().run_once()

    assert repo.storage.list_volume_files() == []
    assert repo.service.get(image).operations[0].state == ops.DONE


def test_a_copy_whose_source_file_was_deleted_fails_with_a_readable_error(repo: Repo) -> None:
    source, ref = snapshot_with_data(repo)
    os.unlink(repo.path(ref))
    copy = new_volume("qcow2")
    image = repo.request({"do": "copy", "source_image": str(source), "volume": copy}, chain=[copy])

    assert repo.executor().run_once() == 1

    op = repo.service.get(image).operations[0]
    assert op.state == ops.FAILED
    assert op.error == f"Volume file {repo.path(ref)} does not exist"
    assert repo.topics(image)[-1] == "StageFailed"
    assert "does not exist" in (repo.service.get(image).last_error or "")
    assert not os.path.exists(repo.path(copy))
    assert repo.executor().run_once() == 0  # a failed stage waits for a mend, it is not retried


@pytest.mark.parametrize("onto", ["grandparent", "nothing"])
def test_a_merge_rebase_run_again_after_qemu_img_was_killed_past_the_new_header_keeps_the_data(
    repo: Repo, tmp_path: Path, onto: str
) -> None:
    """qemu-img rebase writes the new header before the tables of the clusters it copied; a
    host killed (with its qemu-img) between the two leaves the child pointing at its new
    backing without the merged volume's data, which a run that trusted the header would never
    copy again. That state is the unsafe rebase below: same header, same visible content."""
    base, merged, top = three_volume_chain(repo)
    chain = [base, merged, top]
    if onto == "nothing":  # the crash sweep's merge: the merged volume is the chain's base
        qemu.rebase(repo.path(merged), None, fmt="qcow2")
        base, chain = None, [merged, top]  # type: ignore[assignment]
    before = str(tmp_path / "before.raw")
    qemu.convert(repo.path(top), before, src_fmt="qcow2", dst_fmt="raw")
    new_chain = [ref for ref in chain if ref != merged]
    carrier = repo.request(
        {
            "do": "rebase",
            "volume": top,
            "backing": base,
            "old_backing": merged,
            "set_chain": new_chain,
            "drop_volume": merged,
        },
        chain=chain,
        purpose=ops.MERGE,
    )
    qemu.rebase(repo.path(top), base, backing_fmt=base and "qcow2", fmt="qcow2", safe=False)
    assert not qemu.compare(repo.path(top), before, a_fmt="qcow2", b_fmt="raw")

    assert repo.executor().run_once() == 1

    assert repo.service.get(carrier).chain == new_chain
    assert qemu.info(repo.path(top), fmt="qcow2").get("backing-filename") == base
    assert qemu.compare(repo.path(top), before, a_fmt="qcow2", b_fmt="raw")


def test_a_merge_rebases_the_children_of_a_volume_and_drops_it_from_every_chain_at_once(
    repo: Repo, tmp_path: Path
) -> None:
    base, merged, top, other_top = (new_volume("qcow2") for _ in range(4))
    qemu.create(repo.path(base), "qcow2", 4 * MiB)
    qemu.write_pattern(repo.path(base), "qcow2", 0, MiB, 0xA1)
    qemu.create(repo.path(merged), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(merged), "qcow2", MiB, MiB, 0xB2)
    for pattern, ref in ((0xC3, top), (0xD4, other_top)):
        qemu.create(repo.path(ref), "qcow2", None, backing=merged, backing_fmt="qcow2")
        qemu.write_pattern(repo.path(ref), "qcow2", 2 * MiB, MiB, pattern)
    before = {ref: str(tmp_path / f"{ref}.raw") for ref in (top, other_top)}
    for ref, path in before.items():
        qemu.convert(repo.path(ref), path, src_fmt="qcow2", dst_fmt="raw")
    other = repo.request(chain=[base, merged, other_top])
    # Planned when ``other`` ended at other_top; it has grown a top since.
    later = new_volume("qcow2")
    repo.service.update(
        other,
        lambda i: i.change_chain(
            chain=[base, merged, other_top, later], reason="test", host_id="t", now=i.modified_on
        ),
    )
    carrier = repo.request(
        {"do": "rebase", "volume": top, "backing": base},
        {
            "do": "rebase",
            "volume": other_top,
            "backing": base,
            "set_chain": [base, top],
            "chain_changes": {str(other): [base, other_top]},
            "drop_volume": merged,
        },
        chain=[base, merged, top],
        purpose=ops.MERGE,
    )

    assert repo.executor().run_once() == 2

    assert repo.service.get(carrier).chain == [base, top]
    assert repo.service.get(other).chain == [base, other_top, later]
    for ref, path in before.items():
        assert qemu.info(repo.path(ref), fmt="qcow2")["backing-filename"] == base
        assert qemu.compare(repo.path(ref), path, a_fmt="qcow2", b_fmt="raw")
    log = repo.app.operation_log.read()
    assert [r.topic.rsplit(".", 1)[-1] for r in log[-2:]] == ["StageCompleted", "ChainChanged"]
    assert log[-2].txn_last is False  # one transaction: no reader sees one without the other
