"""The deep check's ``verify`` stage on real volumes with the real qemu-img (docs/adr/0033):
sound volumes pass, a damaged one is recorded on its owner with the stage's completion."""

from __future__ import annotations

import struct
import threading
import time
import uuid

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import Stage, VerifyStage
from engine.errors import StageCancelled
from engine.executors.stage_run import StageRun
from engine.executors.verify_stage import verify
from engine.service.check_handlers import DeepCheck, start_deep_check
from engine.service.fix_handlers import stop_fix
from tests.digest_records import record_file_digest
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu


def stage_of(volumes: list[tuple[str, uuid.UUID]]) -> VerifyStage:
    return {
        "do": "verify",
        "volumes": [ref for ref, _ in volumes],
        "owners": {ref: str(owner) for ref, owner in volumes},
    }


def disk_with_data(repo: Repo, fmt: str, size: int = 8 * MiB) -> tuple[uuid.UUID, str]:
    ref = new_volume(fmt)
    qemu.create(repo.path(ref), fmt, size)
    qemu.write_pattern(repo.path(ref), fmt, 0, 4 * MiB, 0x33)
    return repo.request(chain=[ref], size=size, kind=ops.SNAPSHOT), ref


def run_check(repo: Repo, stage: VerifyStage, progress_interval: float = 1.0) -> DeepCheck:
    check = start_deep_check(repo.service, stage)
    assert repo.executor(progress_interval=progress_interval).run_once() == 1
    return check


def l2_table(path: str) -> int:
    """The file offset of a qcow2 volume's first L2 table."""
    with open(path, "rb") as f:
        header = f.read(48)
        (l1_offset,) = struct.unpack(">Q", header[40:48])
        f.seek(l1_offset)
        (entry,) = struct.unpack(">Q", f.read(8))
    return int(entry) & 0x00FFFFFFFFFFFE00


def test_sound_volumes_pass_and_nothing_is_recorded(repo: Repo) -> None:
    snapshot, raw = disk_with_data(repo, "raw")
    other, qcow2 = disk_with_data(repo, "qcow2")

    check = run_check(repo, stage_of([(raw, snapshot), (qcow2, other)]))

    carrier = repo.service.get(check.image_id)
    assert carrier.operations[0].state == ops.DONE
    assert "DamageFound" not in repo.topics(snapshot) + repo.topics(other)
    assert repo.service.get(snapshot).damage == {} == repo.service.get(other).damage


def test_a_corrupt_l2_table_is_found_by_qemu_img_check_and_recorded_on_the_owner(
    repo: Repo,
) -> None:
    snapshot, ref = disk_with_data(repo, "qcow2")
    with open(repo.path(ref), "r+b") as f:  # the first data cluster now lies past the file
        f.seek(l2_table(repo.path(ref)))
        f.write(struct.pack(">Q", (1 << 63) | 0x7F0000000))

    check = run_check(repo, stage_of([(ref, snapshot)]))

    assert repo.topics(snapshot)[-1] == "DamageFound"
    record = repo.service.get(snapshot).damage[ref]
    assert record["ranges"] == []
    assert "qemu-img check found 2 corruption(s)" in record["detail"]
    assert record["found_by"] == repo.host_id
    # In the transaction of the stage's completion, one after the other.
    assert repo.service.get(check.image_id).operations[0].state == ops.DONE
    repo.view.catch_up()
    assert ref in repo.view.damaged()


def test_a_qcow2_header_qemu_cannot_open_is_damage_saying_why(repo: Repo) -> None:
    snapshot, ref = disk_with_data(repo, "qcow2")
    with open(repo.path(ref), "r+b") as f:
        f.seek(40)  # the L1 table's offset: not aligned to a cluster, which QEMU refuses
        f.write(struct.pack(">Q", 12345))

    run_check(repo, stage_of([(ref, snapshot)]))

    detail = repo.service.get(snapshot).damage[ref]["detail"]
    assert detail.startswith("qemu-img check could not read it:")


def test_a_missing_volume_is_passed_over_and_the_rest_is_checked(repo: Repo) -> None:
    gone_owner, gone = disk_with_data(repo, "qcow2")
    snapshot, ref = disk_with_data(repo, "qcow2")
    repo.storage.remove(repo.path(gone))
    with open(repo.path(ref), "r+b") as f:
        f.seek(l2_table(repo.path(ref)))
        f.write(struct.pack(">Q", (1 << 63) | 0x7F0000000))

    run_check(repo, stage_of([(gone, gone_owner), (ref, snapshot)]))

    assert repo.service.get(gone_owner).damage == {}  # the ordinary check reports it
    assert ref in repo.service.get(snapshot).damage


def test_progress_is_reported_in_the_log_volume_by_volume(repo: Repo) -> None:
    volumes = [disk_with_data(repo, "qcow2") for _ in range(3)]

    check = run_check(
        repo, stage_of([(ref, owner) for owner, ref in volumes]), progress_interval=0.001
    )

    topics = repo.topics(check.image_id)
    assert topics.count("StageProgressed") >= 2
    assert topics[-1] == "StageCompleted"


def test_a_cancelled_stage_stops_and_finds_nothing(repo: Repo) -> None:
    volumes = [disk_with_data(repo, "qcow2") for _ in range(3)]
    cancel = threading.Event()
    seen: list[float] = []

    def progress(percent: float) -> None:
        seen.append(percent)
        cancel.set()  # the stop arrives while the first volume is read

    run = StageRun(
        uuid.uuid4(),
        "op",
        0,
        1,
        stage_of([(ref, owner) for owner, ref in volumes]),
        repo.storage,
        qemu,
        repo.find_image,
        progress=progress,
        cancel=cancel,
    )
    with pytest.raises(StageCancelled):
        verify(run, run.stage)  # type: ignore[arg-type]

    assert len(seen) <= 2
    assert run.found == []


# --- content against recorded digests ---------------------------------------------------------


def record_digest(repo: Repo, image_id: uuid.UUID, ref: str) -> None:
    """What a snapshot's digest stage records (docs/adr/0031), computed here from the file."""
    record_file_digest(repo.service, image_id, ref, repo.path(ref), repo.host_id)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def host_offset(path: str, guest_offset: int) -> int:
    """Where in a qcow2 file the guest's byte lies (``qemu-img map``'s ``offset``)."""
    for extent in qemu.map(path, fmt="qcow2"):
        start, length = extent["start"], extent["length"]
        if start <= guest_offset < start + length and extent.get("offset") is not None:
            return int(extent["offset"]) + guest_offset - int(start)
    raise AssertionError(f"guest byte {guest_offset} is not allocated in {path}")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_flipped_byte_in_a_snapshot_is_found_with_the_range_of_its_chunk(
    repo: Repo, fmt: str
) -> None:
    snapshot, ref = disk_with_data(repo, fmt, size=64 * MiB)  # 1 MiB chunks
    qemu.write_pattern(repo.path(ref), fmt, 20 * MiB, 4 * MiB, 0x77)
    record_digest(repo, snapshot, ref)
    guest = 21 * MiB + 12345
    flip_byte(repo.path(ref), guest if fmt == "raw" else host_offset(repo.path(ref), guest))

    run_check(repo, stage_of([(ref, snapshot)]))

    record = repo.service.get(snapshot).damage[ref]
    assert record["ranges"] == [[21 * MiB, 22 * MiB]]
    assert record["detail"] == "data differs from its recorded digest"


def test_sound_data_matches_its_digest(repo: Repo) -> None:
    snapshot, ref = disk_with_data(repo, "qcow2", size=64 * MiB)
    record_digest(repo, snapshot, ref)

    run_check(repo, stage_of([(ref, snapshot)]))

    assert repo.service.get(snapshot).damage == {}


def test_rot_is_reported_on_the_volume_that_holds_the_bytes_not_on_its_overlays(
    repo: Repo,
) -> None:
    """The overlay's digest is checked over what it allocates itself, the rest taken from its
    backing's digest: a rotten backing is found once, in the backing."""
    base_owner, base = disk_with_data(repo, "raw", size=64 * MiB)
    top = new_volume("qcow2")
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="raw")
    qemu.write_pattern(repo.path(top), "qcow2", 40 * MiB, 2 * MiB, 0x55)
    top_owner = repo.request(chain=[base, top], size=64 * MiB, kind=ops.SNAPSHOT)
    record_digest(repo, base_owner, base)
    record_digest(repo, top_owner, top)
    flip_byte(repo.path(base), 2 * MiB + 7)  # under the overlay, which does not hold it
    flip_byte(repo.path(top), host_offset(repo.path(top), 41 * MiB + 3))

    run_check(repo, stage_of([(base, base_owner), (top, top_owner)]))

    assert repo.service.get(base_owner).damage[base]["ranges"] == [[2 * MiB, 3 * MiB]]
    assert repo.service.get(top_owner).damage[top]["ranges"] == [[41 * MiB, 42 * MiB]]


def test_a_long_check_is_stopped_by_a_stop_of_its_carrier(repo: Repo) -> None:
    snapshot, ref = disk_with_data(repo, "raw", size=512 * MiB)
    qemu.write_pattern(repo.path(ref), "raw", 0, 512 * MiB, 0x21)
    record_digest(repo, snapshot, ref)
    check = start_deep_check(repo.service, stage_of([(ref, snapshot)]))
    executor = repo.executor(progress_interval=0.05, poll_interval=0.05).start()
    try:
        deadline = time.monotonic() + 30
        while repo.service.get(check.image_id).operations[0].percent < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stop_fix(repo.service, check.image_id, "enough")
        while executor.busy():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        executor.stop()

    op = repo.service.get(check.image_id).operations[0]
    assert op.state == ops.STOPPED
    assert repo.topics(check.image_id)[-1] == "FixStopped"  # nothing recorded after the stop
    assert repo.service.get(snapshot).damage == {}


# --- what clears a record -----------------------------------------------------------------------


def test_a_record_is_cleared_by_a_stage_of_its_owner_that_makes_the_volume_again_only(
    repo: Repo,
) -> None:
    snapshot, ref = disk_with_data(repo, "qcow2")
    with open(repo.path(ref), "r+b") as f:
        f.seek(l2_table(repo.path(ref)))
        f.write(struct.pack(">Q", (1 << 63) | 0x7F0000000))
    run_check(repo, stage_of([(ref, snapshot)]))

    def queue(*stages: Stage) -> None:
        op = ops.plan(uuid.uuid4().hex, ops.MEND, *stages)
        repo.service.update(
            snapshot,
            lambda i: i.request_fix(
                fix_type=ops.MEND,
                op_id=op["op_id"],
                operation=op,
                host_id=repo.host_id,
                now=repo.service.now(),
            ),
        )
        repo.executor().run_once()

    queue({"do": "resize", "volume": ref, "size": 16 * MiB})  # in place: the rot stays
    assert ref in repo.service.get(snapshot).damage

    queue({"do": "delete", "volumes": [ref]}, {"do": "create", "volume": ref, "size": 16 * MiB})
    assert repo.service.get(snapshot).damage == {}
    repo.view.catch_up()
    assert ref not in repo.view.damaged()
