"""The checkpointed copy (docs/adr/0032): byte-identical copies that record where their data is
durable, resume from there in the file of the attempt that recorded it, and carry the digest of
what they copied; with real qemu-img, qemu-nbd, files and killed processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from engine.aggregates import operations as ops
from engine.executors.checkpointed_copy import Reached, copy_image
from engine.executors.crashpoints import AFTER_PROGRESS, ENVIRONMENT_SWITCH
from engine.formats.qemu.digests import HASH_BYTES, digest_image
from engine.formats.qemu.image_io import open_reader, open_writer
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu

CRASH_HOST = Path(__file__).with_name("crash_host.py")
KiB = 2**10
SIZE = 16 * MiB  # chunks (and checkpoints) of 1 MiB


def run_copy(
    source: str, fmt: str, target: str, target_fmt: str, **options: Any
) -> tuple[list[Reached], Any]:
    reached: list[Reached] = []
    options.setdefault("checkpoint", reached.append)
    with open_reader(source, fmt) as reader, open_writer(target, target_fmt) as writer:
        copied = copy_image(reader, writer, **options)
    return reached, copied


def sparse_raw_with_data_on_chunk_edges(path: str) -> None:
    qemu.create(path, "raw", SIZE)
    qemu.write_pattern(path, "raw", MiB - 4 * KiB, 8 * KiB, 0x11)  # across the first edge
    qemu.write_pattern(path, "raw", 5 * MiB, 2 * MiB, 0x22)  # two whole chunks
    qemu.write_pattern(path, "raw", SIZE - 64 * KiB, 64 * KiB, 0x33)  # the last cluster


def own_data(path: str) -> int:
    """Bytes of data the qcow2 file itself holds (its backing's not counted)."""
    return sum(e["length"] for e in qemu.map(path, fmt="qcow2") if e["depth"] == 0 and e["data"])


def own_clusters(path: str) -> int:
    """Bytes the qcow2 file itself maps, data or zero clusters."""
    extents = qemu.map(path, fmt="qcow2")
    return sum(e["length"] for e in extents if e["depth"] == 0 and (e["data"] or e["zero"]))


def test_a_sparse_raw_volume_copies_into_qcow2_byte_for_byte_with_a_checkpoint_per_chunk(
    tmp_path: Path,
) -> None:
    source, target = str(tmp_path / "source.raw"), str(tmp_path / "target.qcow2")
    sparse_raw_with_data_on_chunk_edges(source)
    qemu.create(target, "qcow2", SIZE)

    reached, copied = run_copy(source, "raw", target, "qcow2")

    assert qemu.compare(source, target, a_fmt="raw", b_fmt="qcow2")
    assert [r.offset for r in reached] == [n * MiB for n in range(1, 17)]
    assert [r.percent for r in reached][-1] == 100
    expected = digest_image(source, "raw")
    assert b"".join(r.chunks for r in reached) == expected.chunks
    assert copied.digest == expected
    assert own_data(target) <= 2 * MiB + 3 * 64 * KiB  # the holes stay holes
    written = [r.written for r in reached]
    assert written == sorted(written) and written[-1] >= 2 * MiB + 72 * KiB


def test_a_qcow2_chain_with_zeroed_clusters_copies_into_raw_byte_for_byte(tmp_path: Path) -> None:
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu.create(base, "qcow2", SIZE)
    qemu.write_pattern(base, "qcow2", 0, 8 * MiB, 0x44)
    qemu.create(top, "qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    qemu.write_pattern(top, "qcow2", 3 * MiB - 64 * KiB, 128 * KiB, 0x55)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -z {6 * MiB} {MiB}", top],
        check=True,
        capture_output=True,
    )  # zeroes over the base's data: the copy must read them as zeroes
    target = str(tmp_path / "target.raw")
    qemu.create(target, "raw", SIZE)

    reached, copied = run_copy(top, "qcow2", target, "raw")

    assert qemu.compare(top, target, a_fmt="qcow2", b_fmt="raw")
    assert len(reached) == 16
    assert copied.digest == digest_image(top, "qcow2")


def test_a_copy_resumed_at_a_checkpoint_writes_only_what_follows_it(tmp_path: Path) -> None:
    source, target = str(tmp_path / "source.qcow2"), str(tmp_path / "target.raw")
    qemu.create(source, "qcow2", SIZE)
    qemu.write_pattern(source, "qcow2", 0, SIZE, 0x66)
    qemu.create(target, "raw", SIZE)

    class Killed(Exception):
        pass

    first: list[Reached] = []

    def die_after_five(reached: Reached) -> None:
        first.append(reached)
        if len(first) == 5:
            raise Killed

    with pytest.raises(Killed):
        run_copy(source, "qcow2", target, "raw", checkpoint=die_after_five)
    done = b"".join(r.chunks for r in first)

    reached, copied = run_copy(source, "qcow2", target, "raw", start=5 * MiB, done_chunks=done)

    assert qemu.compare(source, target, a_fmt="qcow2", b_fmt="raw")
    assert [r.offset for r in reached] == [n * MiB for n in range(6, 17)]
    assert len(reached[0].chunks) == 6 * HASH_BYTES  # the first repeats the ones it took over
    assert copied.digest == digest_image(source, "qcow2")
    assert 11 * MiB <= copied.written < 12 * MiB  # measured by the kernel, at qemu-nbd


def test_an_incremental_copy_holds_only_the_clusters_that_differ_from_its_base(
    tmp_path: Path,
) -> None:
    base, source = str(tmp_path / "base.qcow2"), str(tmp_path / "source.qcow2")
    qemu.create(base, "qcow2", SIZE)
    qemu.write_pattern(base, "qcow2", 0, 8 * MiB, 0x77)
    qemu.create(source, "qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    qemu.write_pattern(source, "qcow2", MiB, 64 * KiB, 0x78)  # changed
    qemu.write_pattern(source, "qcow2", 2 * MiB, MiB, 0x77)  # rewritten, the same bytes
    qemu.write_pattern(source, "qcow2", 10 * MiB, 128 * KiB, 0x79)  # new, over a hole
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -z {4 * MiB} {256 * KiB}", source],
        check=True,
        capture_output=True,
    )  # zeroed over the base's data
    diff = str(tmp_path / "diff.qcow2")
    qemu.create(diff, "qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2")

    with (
        open_reader(source, "qcow2") as reader,
        open_reader(base, "qcow2") as under,
        open_writer(diff, "qcow2") as writer,
    ):
        reached: list[Reached] = []
        copied = copy_image(reader, writer, base=under, checkpoint=reached.append)

    assert qemu.compare(source, diff, a_fmt="qcow2", b_fmt="qcow2")
    assert own_data(diff) == 64 * KiB + 128 * KiB
    assert own_clusters(diff) == 64 * KiB + 128 * KiB + 256 * KiB  # the zeroes as zero clusters
    assert copied.digest == digest_image(source, "qcow2")
    # What the rebase-based incremental copy (before ADR 0032) made holds no less.
    rebased = str(tmp_path / "rebased.qcow2")
    qemu.create(rebased, "qcow2", None, backing="source.qcow2", backing_fmt="qcow2")
    qemu.rebase(rebased, "base.qcow2", backing_fmt="qcow2", fmt="qcow2", safe=True)
    assert qemu.compare(source, rebased, a_fmt="qcow2", b_fmt="qcow2")
    assert own_clusters(diff) <= own_clusters(rebased)


# --- as a stage runs it ---------------------------------------------------------------------


def checkpoints(repo: Repo, image: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    """(host, fields) of the image's StageCheckpointed events, in log order."""
    log = repo.app.operation_log
    log.refresh()
    decode = repo.app.mapper.transcoder.decode
    return [
        (r.host_id, decode(r.state))
        for r in log.read()
        if str(r.originator_id) == str(image) and r.topic.endswith(".StageCheckpointed")
    ]


def copy_request(
    repo: Repo, stage_do: str = "copy", fmt: str = "raw"
) -> tuple[uuid.UUID, str, str]:
    """A snapshot of SIZE bytes of data, and an image (a snapshot's copy) whose stage copies
    it: (the copy's image id, the source's volume, the copy's volume)."""
    source_ref = new_volume("qcow2")
    qemu.create(repo.path(source_ref), "qcow2", SIZE)
    qemu.write_pattern(repo.path(source_ref), "qcow2", 0, SIZE, 0x3C)
    source = repo.request(chain=[source_ref], size=SIZE, kind=ops.SNAPSHOT)
    copy = new_volume(fmt)
    image = repo.request(
        {"do": "copy", "source_image": str(source), "volume": copy},
        chain=[copy],
        size=SIZE,
        kind=ops.SNAPSHOT,
    )
    return image, source_ref, copy


def killed_after_checkpoint(repo: Repo, n: int) -> None:
    killed = subprocess.run(
        [sys.executable, str(CRASH_HOST), repo.storage.root, repo.host_id],
        env={**os.environ, ENVIRONMENT_SWITCH: f"{AFTER_PROGRESS}@{n}"},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()


def test_a_copy_killed_after_a_checkpoint_resumes_in_its_file_and_records_its_digest(
    repo: Repo,
) -> None:
    image, source_ref, copy = copy_request(repo)
    killed_after_checkpoint(repo, 5)
    [left] = repo.temporaries()
    assert left.endswith("-e1")

    assert repo.executor().run_once() == 1

    assert qemu.compare(repo.path(source_ref), repo.path(copy), a_fmt="qcow2", b_fmt="raw")
    saved = [fields for _, fields in checkpoints(repo, image)]
    assert [(c["epoch"], c["offset"]) for c in saved] == [(1, n * MiB) for n in range(1, 6)] + [
        (2, n * MiB) for n in range(6, 17)
    ]
    assert len(saved[5]["chunks"]) == 6 * HASH_BYTES
    assert saved[-1]["written"] < 12 * MiB  # 11 MiB left: not the whole copy again
    expected = digest_image(repo.path(source_ref), "qcow2")
    got = repo.service.get(image)
    assert got.digests[copy]["digest"] == expected.digest
    assert got.digests[copy]["chunks"] == expected.chunks
    assert got.operations[0].state == ops.DONE
    assert got.operations[0].checkpoint_chunks == b""  # cleared with the completion
    assert repo.topics(image).count("VolumeDigested") == 1
    assert repo.temporaries() == []


def test_a_checkpoint_whose_file_is_gone_starts_the_copy_again_from_zero(repo: Repo) -> None:
    image, source_ref, copy = copy_request(repo)
    killed_after_checkpoint(repo, 5)
    [left] = repo.temporaries()
    repo.storage.remove(left)

    assert repo.executor().run_once() == 1

    assert qemu.compare(repo.path(source_ref), repo.path(copy), a_fmt="qcow2", b_fmt="raw")
    resumed = [f for _, f in checkpoints(repo, image) if f["epoch"] == 2]
    assert resumed[0]["offset"] == MiB and len(resumed[0]["chunks"]) == HASH_BYTES
    expected = digest_image(repo.path(source_ref), "qcow2")
    assert repo.service.get(image).digests[copy]["digest"] == expected.digest


def test_a_stale_temporary_file_without_a_checkpoint_is_removed(repo: Repo) -> None:
    image, source_ref, copy = copy_request(repo, fmt="qcow2")
    volume_id, fmt = copy.split(".")
    stale = repo.storage.temp_path(volume_id, fmt, "0123abcd-0-e1")
    qemu.create(stale, "qcow2", SIZE)
    qemu.write_pattern(stale, "qcow2", 0, MiB, 0xEE)

    assert repo.executor().run_once() == 1

    assert repo.temporaries() == []
    assert qemu.compare(repo.path(source_ref), repo.path(copy), a_fmt="qcow2", b_fmt="qcow2")
    assert checkpoints(repo, image)[0][1]["offset"] == MiB


def hold_open(path: str, fmt: str) -> subprocess.Popen[bytes]:
    """A process that holds ``path`` open for writing, as a fenced host's writer would."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        holder = subprocess.Popen(
            ["qemu-io", "-f", fmt, "-c", "sleep 60000", path], stderr=subprocess.DEVNULL
        )
        # Looking (a second writer's open) takes locks too, which can make the holder's own
        # open fail: then it exits and is started again. Once it holds its lock, looking only
        # ever sees the lock.
        while holder.poll() is None and time.monotonic() < deadline:
            look = subprocess.run(["qemu-io", "-f", fmt, "-c", "quit", path], capture_output=True)
            if b'Failed to get "write" lock' in look.stderr and holder.poll() is None:
                return holder
            time.sleep(0.05)
        holder.kill()
        holder.wait()
    raise AssertionError(f"could not hold {path} open for writing")


def test_a_checkpoint_whose_file_another_process_holds_starts_again_in_a_new_file(
    repo: Repo,
) -> None:
    # qcow2: QEMU's raw driver lets a second writer in (ADR 0032 says why that is harmless).
    fmt = "qcow2"
    image, source_ref, copy = copy_request(repo, fmt=fmt)
    killed_after_checkpoint(repo, 5)
    [left] = repo.temporaries()
    holder = hold_open(left, fmt)
    try:
        assert repo.executor().run_once() == 1

        assert qemu.compare(repo.path(source_ref), repo.path(copy), a_fmt="qcow2", b_fmt=fmt)
        assert repo.temporaries() == []  # the held file lost its name: nobody publishes it
        resumed = [f for _, f in checkpoints(repo, image) if f["epoch"] == 2]
        assert resumed[0]["offset"] == MiB
    finally:
        holder.kill()
        holder.wait()


def test_an_incremental_copy_killed_after_a_checkpoint_resumes_and_holds_only_the_changes(
    repo: Repo,
) -> None:
    base_ref, top_ref = new_volume("qcow2"), new_volume("qcow2")
    qemu.create(repo.path(base_ref), "qcow2", SIZE)
    qemu.write_pattern(repo.path(base_ref), "qcow2", 0, SIZE, 0x21)
    qemu.create(repo.path(top_ref), "qcow2", None, backing=base_ref, backing_fmt="qcow2")
    for n in range(16):  # one changed cluster in every chunk
        qemu.write_pattern(repo.path(top_ref), "qcow2", n * MiB + 128 * KiB, 64 * KiB, 0x22)
    source = repo.request(chain=[base_ref, top_ref], size=SIZE, kind=ops.SNAPSHOT)
    diff = new_volume("qcow2")
    stage = {"do": "diff", "source_image": str(source), "volume": diff, "base": base_ref}
    image = repo.request(stage, chain=[base_ref, diff], size=SIZE, kind=ops.SNAPSHOT)  # type: ignore[arg-type]
    killed_after_checkpoint(repo, 7)

    assert repo.executor().run_once() == 1

    assert qemu.compare(repo.path(top_ref), repo.path(diff))
    assert qemu.info(repo.path(diff), fmt="qcow2")["backing-filename"] == base_ref
    assert own_data(repo.path(diff)) == 16 * 64 * KiB
    resumed = [f for _, f in checkpoints(repo, image) if f["epoch"] == 2]
    assert resumed[0]["offset"] == 8 * MiB
    expected = digest_image(repo.path(top_ref), "qcow2")
    assert repo.service.get(image).digests[diff]["digest"] == expected.digest
    assert repo.temporaries() == []
