"""The deep check's ``verify`` stage on real volumes with the real qemu-img (docs/adr/0033):
sound volumes pass, a damaged one is recorded on its owner with the stage's completion."""

from __future__ import annotations

import struct
import threading
import uuid

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import VerifyStage
from engine.errors import StageCancelled
from engine.executors.stage_run import StageRun
from engine.executors.verify_stage import verify
from engine.service.check_handlers import DeepCheck, start_deep_check
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
