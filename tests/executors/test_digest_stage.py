"""The ``digest`` stage on real volumes: a snapshot's volume read once, through its chain, and its
digest recorded with the stage's completion (engine/executors/digest_stage.py, docs/adr/0031).
Each digest is checked against one computed apart: ``qemu-img convert -O raw`` and hashlib."""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.aggregates import operations as ops
from engine.aggregates import stage_kinds
from engine.aggregates.stage_kinds import DigestStage
from engine.executors import digest_stage
from engine.executors.digest_stage import digest
from engine.executors.stage_run import StageRun
from engine.formats.qemu import digests, image_io
from engine.formats.qemu.digests import VolumeDigest, chunk_size_for
from engine.projections.status import image_status
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu

SIZE = 64 * MiB  # chunks of 1 MiB


def independent_digest(path: str, fmt: str, tmp_path: Path) -> VolumeDigest:
    """The digest of what a guest reads, computed without Strata's reader."""
    raw = tmp_path / f"{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    chunk = chunk_size_for(len(data))
    hashes = b"".join(
        hashlib.sha256(data[at : at + chunk]).digest() for at in range(0, len(data), chunk)
    )
    return VolumeDigest(len(data), chunk, hashes)


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The bytes of data every reader of guest bytes read, in the order read."""
    read: list[int] = []
    real = image_io.ImageReader.read_into

    def counting(self: image_io.ImageReader, offset: int, buf: memoryview) -> None:
        read.append(len(buf))
        real(self, offset, buf)

    monkeypatch.setattr(image_io.ImageReader, "read_into", counting)
    yield read


def snapshot(
    repo: Repo, chain: list[str], stage: DigestStage | None = None, size: int = SIZE
) -> uuid.UUID:
    """A snapshot image over ``chain`` whose one operation is the digest of its top."""
    work = stage if stage is not None else {"do": "digest", "volume": chain[-1]}
    return repo.request(work, chain=chain, size=size, kind=ops.SNAPSHOT, purpose=ops.SNAPSHOT)


def recorded(repo: Repo, image: uuid.UUID, ref: str) -> VolumeDigest:
    record = repo.service.get(image).digests[ref]
    found = VolumeDigest(record["size"], record["chunk_size"], record["chunks"])
    assert record["digest"] == found.digest
    return found


def base_with_data(repo: Repo) -> str:
    """A qcow2 volume with data in 3 places, a zeroed range, and the rest never written."""
    base = new_volume("qcow2")
    qemu.create(repo.path(base), "qcow2", SIZE)
    qemu.write_pattern(repo.path(base), "qcow2", 0, 3 * MiB, 0x11)
    qemu.write_pattern(repo.path(base), "qcow2", 10 * MiB + 4096, 5 * MiB, 0x22)
    qemu.write_pattern(repo.path(base), "qcow2", SIZE - MiB, MiB, 0x33)
    return base


def test_a_digest_makes_nothing_waits_for_what_it_reads_and_runs_beside_a_daemon() -> None:
    volume, backing, new_top = (new_volume("qcow2") for _ in range(3))
    stage: DigestStage = {
        "do": "digest", "volume": volume, "backing": backing, "frozen_by": new_top
    }  # fmt: skip

    assert stage_kinds.produced_by(stage) is None
    assert stage_kinds.changed_by(stage) is None
    assert stage_kinds.local_inputs(stage) == [volume, backing, new_top]
    assert stage_kinds.has_live_form(stage)  # it only reads: an attached snapshot keeps it


def test_a_raw_volume_s_digest_is_recorded_with_the_stage_s_completion(
    repo: Repo, tmp_path: Path
) -> None:
    volume = new_volume("raw")
    qemu.create(repo.path(volume), "raw", SIZE)
    qemu.write_pattern(repo.path(volume), "raw", 5 * MiB, 7 * MiB + 512, 0x5A)
    image = snapshot(repo, [volume])

    assert repo.executor().run_once() == 1

    assert recorded(repo, image, volume) == independent_digest(repo.path(volume), "raw", tmp_path)
    assert repo.service.get(image).operations[0].state == ops.DONE
    topics = repo.topics(image)
    assert topics[0] == "ImageRequested" and topics[1] == "StageClaimed"
    assert topics[-2:] == ["StageCompleted", "VolumeDigested"]  # in one transaction
    assert repo.temporaries() == []


def test_an_overlay_reads_only_its_own_chunks_and_takes_the_rest_from_its_backing_s_digest(
    repo: Repo, tmp_path: Path, bytes_read: list[int]
) -> None:
    base = base_with_data(repo)
    first = snapshot(repo, [base])
    repo.executor().run_once()
    assert sum(bytes_read) >= 9 * MiB  # no digest to lean on: all its data read
    top = new_volume("qcow2")
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(top), "qcow2", 11 * MiB, MiB, 0x44)  # inside one chunk
    second = snapshot(repo, [base, top], {"do": "digest", "volume": top, "backing": base})
    bytes_read.clear()

    assert repo.executor().run_once() == 1

    assert sum(bytes_read) == MiB  # the one chunk the overlay allocates
    assert recorded(repo, second, top) == independent_digest(repo.path(top), "qcow2", tmp_path)
    assert recorded(repo, first, base) == independent_digest(repo.path(base), "qcow2", tmp_path)


def test_an_overlay_whose_backing_has_no_digest_yet_is_read_whole(
    repo: Repo, tmp_path: Path, bytes_read: list[int]
) -> None:
    base = base_with_data(repo)
    top = new_volume("qcow2")
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(top), "qcow2", 11 * MiB, MiB, 0x44)
    image = snapshot(repo, [base, top], {"do": "digest", "volume": top, "backing": base})

    repo.executor().run_once()

    assert sum(bytes_read) >= 9 * MiB
    assert recorded(repo, image, top) == independent_digest(repo.path(top), "qcow2", tmp_path)


def test_a_backing_digest_of_another_size_is_not_used(repo: Repo, tmp_path: Path) -> None:
    base = base_with_data(repo)
    snapshot(repo, [base])
    repo.executor().run_once()
    top = new_volume("qcow2")  # the disk grew after its base was frozen
    qemu.create(repo.path(top), "qcow2", 2 * SIZE, backing=base, backing_fmt="qcow2")
    qemu.write_pattern(repo.path(top), "qcow2", SIZE + MiB, MiB, 0x44)
    image = snapshot(
        repo, [base, top], {"do": "digest", "volume": top, "backing": base}, size=2 * SIZE
    )

    repo.executor().run_once()

    assert recorded(repo, image, top) == independent_digest(repo.path(top), "qcow2", tmp_path)


def test_a_digest_run_again_computes_the_same_digest(repo: Repo) -> None:
    base = base_with_data(repo)
    stage: DigestStage = {"do": "digest", "volume": base}
    image = snapshot(repo, [base], stage)

    def attempt(epoch: int) -> list[tuple[str, VolumeDigest]]:
        kept: list[tuple[str, VolumeDigest]] = []
        run = StageRun(
            image, "op", 0, epoch, stage, repo.storage, qemu, repo.find_image,
            keep_digest=lambda ref, found: kept.append((ref, found)),
        )  # fmt: skip
        digest(run, stage)
        return kept

    first, again = attempt(1), attempt(2)

    assert len(first) == 1 and first == again
    assert first[0][0] == base


def test_the_digest_waits_until_the_disk_s_new_top_is_made(repo: Repo) -> None:
    base = base_with_data(repo)
    new_top = new_volume("qcow2")
    image = snapshot(repo, [base], {"do": "digest", "volume": base, "frozen_by": new_top})
    repo.request(  # held until a fix: auto_fix=False
        {"do": "create", "volume": new_top, "backing": base},
        chain=[base, new_top],
        size=SIZE,
        auto_fix=False,
    )
    repo.view.catch_up()

    assert repo.executor().run_once() == 0  # the disk's top is still to be made
    assert image_status(repo.service.get(image), repo.view).status == "optimized"
    assert repo.service.get(image).digests == {}


def test_a_failed_digest_leaves_the_snapshot_usable_saying_why(repo: Repo) -> None:
    volume = new_volume("qcow2")  # named, never made: nothing can be read
    image = snapshot(repo, [volume])

    repo.executor().run_once()

    repo.view.catch_up()
    current = repo.service.get(image)
    status = image_status(current, repo.view)
    assert current.operations[0].state == ops.FAILED
    assert status.status == "optimized"
    assert status.stage == "1/1"
    assert status.last_error is not None and volume in status.last_error


def test_a_digest_keeps_no_writer_out_of_the_volume_it_reads(repo: Repo, tmp_path: Path) -> None:
    """It takes no image lock: a block job committing into the volume of a snapshot removed
    while its digest runs must not fail on it (docs/adr/0031)."""
    base = base_with_data(repo)
    top = new_volume("qcow2")
    qemu.create(repo.path(top), "qcow2", None, backing=base, backing_fmt="qcow2")
    image = snapshot(repo, [base, top], {"do": "digest", "volume": top, "backing": base})
    holder = subprocess.Popen(  # a writer of the backing, as a commit's daemon would be
        ["qemu-io", "-f", "qcow2", "-c", "sleep 600000", repo.path(base)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30  # qemu-io starts slowly on a loaded machine
        while not locked(repo.path(base)):
            if holder.poll() is not None:
                raise AssertionError(f"qemu-io ended: {holder.communicate()[1]}")
            assert time.monotonic() < deadline, "qemu-io never took its lock"
            time.sleep(0.02)

        repo.executor().run_once()

        assert locked(repo.path(base))  # the writer was there all along
    finally:
        holder.kill()
        holder.wait()
    assert recorded(repo, image, top) == independent_digest(repo.path(top), "qcow2", tmp_path)


def locked(path: str) -> bool:
    """Whether another process holds QEMU's write lock on the image (qemu-img info fails)."""
    done = subprocess.run(["qemu-img", "info", path], capture_output=True, text=True)
    return done.returncode != 0 and "lock" in done.stderr


def test_the_digest_of_a_snapshot_removed_meanwhile_is_not_recorded(
    repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = base_with_data(repo)
    image = snapshot(repo, [base])
    real = digests.digest_image

    def removed_while_read(path: str, fmt: str, **kwargs: Any) -> VolumeDigest:
        found = real(path, fmt, **kwargs)
        repo.service.update(image, lambda i: i.remove(host_id="host-b", now=repo.service.now()))
        return found

    monkeypatch.setattr(digest_stage, "digest_image", removed_while_read)

    repo.executor().run_once()

    assert repo.service.get(image).digests == {}
    assert "VolumeDigested" not in repo.topics(image)


def test_a_removed_snapshot_s_digest_ends_unrun_and_frees_its_queue(repo: Repo) -> None:
    base = base_with_data(repo)
    image = snapshot(repo, [base])

    repo.service.update(image, lambda i: i.remove(host_id="host-b", now=repo.service.now()))

    assert repo.executor().run_once() == 0
    (op,) = repo.service.get(image).operations
    assert (op.state, op.aborted, op.done) == (ops.DONE, True, 0)
    assert repo.service.get(image).digests == {}
