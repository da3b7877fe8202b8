"""Which stages an executor claims, in which order, and how it stops."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import CopyStage, CreateStage, Stage
from engine.errors import ExecutorFailed
from engine.formats.qemu.image_tools import QemuImg
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def rate_limited_qemu(tmp_path: Path, rate: str) -> QemuImg:
    """The real qemu-img, with its copies throttled to ``rate`` bytes a second (``-r``), so
    that a copy of a few MiB lasts long enough to be stopped. One coroutine (``-m 1``): with
    several, qemu-img reports 100% at once and spends the throttled time after it."""
    script = tmp_path / "slow-qemu-img"
    real = shutil.which("qemu-img")
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = convert ]; then shift; exec {real} convert -m 1 -r {rate} "$@"; fi\n'
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    # Checkpointed copies (docs/adr/0032) read through qemu-nbd: throttled by copy_rate.
    return QemuImg(qemu_img=str(script), copy_rate=int(rate.rstrip("M")) * MiB)


def copy_of_data(repo: Repo, size: int = 16 * MiB) -> tuple[uuid.UUID, str, str]:
    """An image whose one stage copies a snapshot holding ``size`` bytes of data."""
    source_ref = new_volume("qcow2")
    qemu.create(repo.path(source_ref), "qcow2", size)
    qemu.write_pattern(repo.path(source_ref), "qcow2", 0, size, 0x6B)
    source = repo.request(chain=[source_ref], size=size, kind=ops.SNAPSHOT)
    copy = new_volume("qcow2")
    stage: CopyStage = {"do": "copy", "source_image": str(source), "volume": copy}
    return repo.request(stage, chain=[copy], size=size), source_ref, copy


def processes_writing(path: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if path.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_a_disk_snapshotted_at_once_gets_its_volume_then_its_new_overlay(repo: Repo) -> None:
    first, overlay = new_volume("qcow2"), new_volume("qcow2")
    disk = repo.request({"do": "create", "volume": first, "size": 4 * MiB}, chain=[first])
    snapshot = uuid.uuid4()
    overlay_stage: CreateStage = {
        "do": "create", "volume": overlay, "size": 4 * MiB, "backing": first
    }  # fmt: skip
    work = ops.plan(uuid.uuid4().hex, "snapshot", overlay_stage)
    frozen = repo.service.update(
        disk,
        lambda i: i.take_snapshot(
            snapshot_id=snapshot, new_top=overlay, operations=[work], host_id="h", now=i.modified_on
        ),
    )
    repo.request(chain=frozen, kind=ops.SNAPSHOT, image_id=snapshot)

    assert repo.executor().run_once() == 2

    assert repo.service.get(disk).chain == [first, overlay]
    assert repo.service.get(snapshot).chain == [first]
    assert qemu.info(repo.path(overlay), fmt="qcow2")["backing-filename"] == first
    assert all(op.state == ops.DONE for op in repo.service.get(disk).operations)


def test_a_clone_of_a_snapshot_waits_until_the_snapshot_volume_is_produced(repo: Repo) -> None:
    shared, overlay = new_volume("qcow2"), new_volume("qcow2")
    producer = repo.request(
        {"do": "create", "volume": shared, "size": 4 * MiB}, chain=[shared], auto_fix=False
    )
    repo.request(chain=[shared], kind=ops.SNAPSHOT)
    clone = repo.request(
        {"do": "create", "volume": overlay, "size": 4 * MiB, "backing": shared},
        chain=[shared, overlay],
    )
    executor = repo.executor()

    assert executor.run_once() == 0
    assert repo.topics(clone) == ["ImageRequested"]  # not claimed, not failed: waiting

    held = repo.service.get(producer).operations[0].op_id
    repo.service.update(
        producer,
        lambda i: i.request_fix(
            fix_type=ops.MEND, op_id=held, operation=None, host_id="host-a", now=i.modified_on
        ),
    )
    assert executor.run_once() == 2

    assert qemu.info(repo.path(overlay), fmt="qcow2")["backing-filename"] == shared
    assert repo.topics(clone)[-1] == "StageCompleted"


def test_a_removed_images_own_work_is_not_run_but_its_clean_is(repo: Repo) -> None:
    never, leftover = new_volume("qcow2"), new_volume("raw")
    qemu.create(repo.path(leftover), "raw", MiB)
    abandoned = repo.request({"do": "create", "volume": never, "size": MiB}, chain=[never])
    freed = repo.request(
        {"do": "delete", "volumes": [leftover]}, chain=[leftover], purpose=ops.CLEAN
    )
    for image in (abandoned, freed):
        repo.service.update(image, lambda i: i.remove(host_id="host-a", now=i.modified_on))

    assert repo.executor().run_once() == 1

    assert not os.path.exists(repo.path(never))
    assert not os.path.exists(repo.path(leftover))
    assert repo.topics(abandoned)[-1] == "ImageRemoved"


def test_a_stage_claimed_by_another_host_is_left_to_it(repo: Repo) -> None:
    ref = new_volume("qcow2")
    image = repo.request({"do": "create", "volume": ref, "size": MiB}, chain=[ref])
    op_id = repo.service.get(image).operations[0].op_id
    repo.service.update(
        image, lambda i: i.claim(op_id=op_id, stage=0, host_id="host-b", now=i.modified_on)
    )

    assert repo.executor().run_once() == 0

    assert repo.service.get(image).operations[0].claim_host == "host-b"
    assert not os.path.exists(repo.path(ref))


def test_a_stage_this_host_claimed_before_it_crashed_is_claimed_again_and_run(
    repo: Repo,
) -> None:
    ref = new_volume("qcow2")
    image = repo.request({"do": "create", "volume": ref, "size": MiB}, chain=[ref])
    op_id = repo.service.get(image).operations[0].op_id
    repo.service.update(
        image, lambda i: i.claim(op_id=op_id, stage=0, host_id="host-a", now=i.modified_on)
    )

    assert repo.executor().run_once() == 1

    assert repo.topics(image) == [
        "ImageRequested", "StageClaimed", "StageClaimed", "StageCompleted"
    ]  # fmt: skip
    assert repo.service.get(image).operations[0].claim_epoch == 2
    assert qemu.info(repo.path(ref), fmt="qcow2")["virtual-size"] == MiB


def test_a_temporary_file_left_by_a_crashed_attempt_is_removed_and_the_copy_redone(
    repo: Repo,
) -> None:
    image, source_ref, copy = copy_of_data(repo, size=4 * MiB)
    op_id = repo.service.get(image).operations[0].op_id
    half_done = repo.storage.temp_path(copy.split(".")[0], "qcow2", f"{op_id}-0-e1")
    qemu.create(half_done, "qcow2", 4 * MiB)  # empty: a copy killed early

    assert repo.executor().run_once() == 1

    assert qemu.compare(repo.path(source_ref), repo.path(copy))
    assert repo.temporaries() == []


def test_a_volume_published_before_a_crash_is_kept_and_its_stage_completed(repo: Repo) -> None:
    image, source_ref, copy = copy_of_data(repo, size=4 * MiB)
    op_id = repo.service.get(image).operations[0].op_id
    # The crash fell between publish's link() and unlink(): two names for the finished file.
    temp = repo.storage.temp_path(copy.split(".")[0], "qcow2", f"{op_id}-0-e1")
    qemu.convert(repo.path(source_ref), temp, src_fmt="qcow2", dst_fmt="qcow2")
    os.link(temp, repo.path(copy))
    inode = os.stat(repo.path(copy)).st_ino

    assert repo.executor().run_once() == 1

    assert os.stat(repo.path(copy)).st_ino == inode  # not copied again
    assert repo.temporaries() == []
    assert repo.service.get(image).operations[0].state == ops.DONE


def test_a_stage_kind_this_version_does_not_know_is_left_for_a_newer_host(repo: Repo) -> None:
    # A stage from the log of a newer Strata: not one of this version's forms.
    newer = cast(Stage, {"do": "compress", "volume": new_volume("qcow2")})
    image = repo.request(newer, chain=[])

    assert repo.executor().run_once() == 0

    assert repo.topics(image) == ["ImageRequested"]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"do": "copy", "volume": new_volume("qcow2")}, "'copy' stage needs 'source_image'"),
        ({"do": "create", "volume": "disk.img", "size": MiB}, "not a volume reference"),
    ],
    ids=["missing-field", "bad-volume"],
)
def test_a_malformed_stage_fails_with_a_message_saying_what_is_wrong(
    repo: Repo, stage: dict[str, object], message: str
) -> None:
    image = repo.request(cast(Stage, stage), chain=[])  # malformed on purpose

    assert repo.executor().run_once() == 1

    assert message in (repo.service.get(image).operations[0].error or "")


def test_the_running_executor_runs_two_images_at_a_time_and_each_to_the_end(
    repo: Repo, tmp_path: Path
) -> None:
    images = [copy_of_data(repo, size=6 * MiB) for _ in range(3)]  # about 0.5 s each
    executor = repo.executor(
        qemu_img=rate_limited_qemu(tmp_path, "4M"), workers=2, poll_interval=0.1
    ).start()
    try:
        eventually(lambda: all(repo.topics(i)[-1] == "StageCompleted" for i, _, _ in images))
        eventually(lambda: not executor.busy(), timeout=2)
    finally:
        executor.stop()

    for _, source_ref, copy in images:
        assert qemu.compare(repo.path(source_ref), repo.path(copy))
    log = repo.app.operation_log.read()
    order = [(r.topic.rsplit(".", 1)[-1], str(r.originator_id)) for r in log]
    first_done = next(n for n, (topic, _) in enumerate(order) if topic == "StageCompleted")
    claims_before = [o for topic, o in order[:first_done] if topic == "StageClaimed"]
    assert len(claims_before) == 2  # two copies ran together, the third waited for a worker


def test_stopping_the_operation_during_a_long_copy_kills_qemu_img_and_publishes_nothing(
    repo: Repo, tmp_path: Path
) -> None:
    image, _, copy = copy_of_data(repo, size=16 * MiB)  # about 4 s at the throttled rate
    executor = repo.executor(
        qemu_img=rate_limited_qemu(tmp_path, "4M"), poll_interval=0.1, progress_interval=0.1
    ).start()
    try:
        eventually(lambda: "StageCheckpointed" in repo.topics(image))
        [temp] = repo.temporaries()
        started = time.monotonic()
        repo.service.update(
            image, lambda i: i.stop(reason="not wanted", host_id="operator", now=i.modified_on)
        )
        eventually(lambda: not executor.busy(), timeout=3)
        stopped_after = time.monotonic() - started
    finally:
        executor.stop()

    assert stopped_after < 2.0
    assert processes_writing(temp) == []
    assert not os.path.exists(repo.path(copy))
    assert repo.temporaries() == [temp]  # left for the next attempt or a clean fix
    op = repo.service.get(image).operations[0]
    assert op.state == ops.STOPPED and op.error == "stopped by operator: not wanted"
    assert repo.topics(image)[-1] == "FixStopped"


def test_a_copy_cancelled_by_stopping_the_executor_is_finished_by_its_next_run(
    repo: Repo, tmp_path: Path
) -> None:
    image, source_ref, copy = copy_of_data(repo, size=16 * MiB)
    executor = repo.executor(
        qemu_img=rate_limited_qemu(tmp_path, "4M"), poll_interval=0.1, progress_interval=0.1
    ).start()
    eventually(lambda: "StageCheckpointed" in repo.topics(image))
    started = time.monotonic()
    executor.stop(timeout=0)

    assert time.monotonic() - started < 2.0
    assert not os.path.exists(repo.path(copy))
    assert repo.service.get(image).operations[0].claim_host == "host-a"

    assert repo.executor().run_once() == 1

    assert qemu.compare(repo.path(source_ref), repo.path(copy))
    assert repo.temporaries() == []
    assert repo.topics(image).count("StageClaimed") == 2


def test_an_unexpected_error_stops_the_executor_and_surfaces_when_it_is_stopped(
    repo: Repo,
) -> None:
    copy_of_data(repo, size=MiB)

    def broken_lookup(image_id: uuid.UUID) -> None:
        raise RuntimeError("lookup table corrupted")

    executor = repo.executor(poll_interval=0.1)
    executor.find_image = broken_lookup
    executor.start()
    eventually(lambda: bool(executor.errors))

    with pytest.raises(ExecutorFailed, match="lookup table corrupted"):
        executor.stop()
