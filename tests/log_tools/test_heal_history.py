"""``strata-log history`` on a log of self-healing data: a snapshot's digest, the rot a deep check
found in it, and its mend from a replica in another repository, each said as a sentence
(log_tools/heal.py); a copy's checkpoints too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine import StorageEngine
from engine.formats.qemu.image_tools import QemuImg
from log_tools import heal
from tests.facade.test_mend_replica import (
    REPOS,
    digest,
    family,
    flip_a_data_byte,
    image,
    mends,
    record_rot,
    settle,
    top_path,
)
from tests.log_tools.cli import strata_log

MiB = 2**20


@dataclass(frozen=True)
class HealedLog:
    repo: Path
    snap: str
    volume: str
    digest: str
    mend_op: str


@pytest.fixture(scope="module")
def healed(tmp_path_factory: pytest.TempPathFactory) -> HealedLog:
    """A snapshot in r1, copied to r2; a byte of r1's flipped, the rot recorded, and mended from
    r2 by the fix the check offered."""
    root = tmp_path_factory.mktemp("heal")
    qemu = QemuImg()
    with StorageEngine("host-a", state_dir=str(root / "state"), poll_interval=0.1) as se:
        for name in REPOS:
            (root / name).mkdir()
            se.create_storage_repository("localfs-1.0", {"path": str(root / name)})
            se.connect_storage_repository(name, "localfs-1.0", {"path": str(root / name)})
        snap, disk = family(se, qemu)
        recorded = digest(se, "r1", snap)
        assert recorded == digest(se, "r2", snap)
        flip_a_data_byte(qemu, *top_path(se, "r1", snap))
        record_rot(se, "r1", snap, [[0, MiB]])
        (mend,) = mends(se)
        se.fix_storage_repository("r1", mend)
        settle(se, "r1", snap, disk)
        op = image(se, "r1", snap).last_operation()
        assert op is not None
        volume = image(se, "r1", snap).chain[-1]
    return HealedLog(root / "r1", snap, volume, recorded, op.op_id)


@pytest.fixture(scope="module")
def lines(healed: HealedLog) -> list[str]:
    done = strata_log("history", healed.repo, healed.snap)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def event_lines(lines: list[str], event: str) -> list[str]:
    return [line.split(f"  {event}  ", 1)[1] for line in lines if f"  {event}  " in line]


def test_a_digest_is_said_with_its_first_hex_digits_and_its_chunks(
    healed: HealedLog, lines: list[str]
) -> None:
    said = event_lines(lines, "VolumeDigested")
    assert said and said[0] == (
        f"digest of volume {healed.volume}: sha256 {healed.digest[:12]}… over 8 chunks of 1 MiB"
    )


def test_rot_is_said_with_the_volume_the_bytes_and_what_was_found(
    healed: HealedLog, lines: list[str]
) -> None:
    assert event_lines(lines, "DamageFound") == [
        f"rot found in volume {healed.volume} at bytes 0-1048576: sha256 of the chunk differs "
        "from the one recorded"
    ]


def test_a_mend_is_said_from_its_request_to_its_last_stage(
    healed: HealedLog, lines: list[str]
) -> None:
    r2 = healed.repo.parent / "r2"
    (requested,) = event_lines(lines, "FixRequested")
    assert requested == (
        f"mend {healed.mend_op} requested by host-a: delete {healed.volume}; copy image "
        f"{healed.snap} in {r2} into {healed.volume}"
    )
    completed = [line for line in event_lines(lines, "StageCompleted") if "of mend" in line]
    assert completed == [
        f"stage 1/2 of mend {healed.mend_op} completed (delete {healed.volume})",
        f"stage 2/2 of mend {healed.mend_op} completed (copy image {healed.snap} in {r2} into "
        f"{healed.volume}): the mend is done",
    ]


def test_checkpoints_say_how_far_the_copy_is(lines: list[str]) -> None:
    # The copies of this log write checkpoints once copies are resumable (docs/adr/0032).
    for line in event_lines(lines, "StageCheckpointed"):
        assert re.fullmatch(
            r"checkpoint of stage \d+: [0-9.]+ (GiB|MiB|KiB|bytes) copied \(\d+%\)", line
        )
    fields = {"op_id": "op", "stage": 1, "epoch": 1, "offset": 3 * 2**29, "percent": 37}
    assert heal.describe("StageCheckpointed", fields, "host-a", heal.Operations()) == (
        "checkpoint of stage 2: 1.5 GiB copied (37%)"
    )


def test_other_completions_are_still_shown_as_their_fields(lines: list[str]) -> None:
    others = [line for line in event_lines(lines, "StageCompleted") if "of mend" not in line]
    assert all(line.startswith("op_id=") for line in others)


def test_a_mend_that_makes_an_overlay_again_says_over_what_and_from_where() -> None:
    stage = {
        "do": "diff",
        "source_image": "5e1f",
        "source_root": "/srv/r2",
        "base": "b.qcow2",
        "volume": "v.qcow2",
    }
    assert heal.stage_words(stage) == "make v.qcow2 over b.qcow2 from image 5e1f in /srv/r2"
    assert heal.stage_words({"do": "create", "volume": "v.qcow2", "backing": "b.qcow2"}) == (
        "create v.qcow2 empty over b.qcow2"
    )
