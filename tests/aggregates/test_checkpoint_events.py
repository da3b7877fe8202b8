"""``StageCheckpointed`` (docs/adr/0032): an attempt's checkpoints add up, a later attempt's
first one replaces them, the stage's completion clears them, and a host whose claim moved on
cannot record one."""

from __future__ import annotations

import hashlib

import pytest

from engine.aggregates.image import Image
from engine.aggregates.operations import Checkpoint
from engine.errors import ClaimLost, InvalidParameter
from engine.projections import folded_state
from tests.aggregates.test_image import NOW, disk


def h(n: int) -> bytes:
    return hashlib.sha256(bytes([n])).digest()


def save(image: Image, epoch: int, offset: int, chunks: bytes, host: str = "a") -> None:
    image.checkpoint(
        op_id="create", stage=0, epoch=epoch, offset=offset, percent=offset * 100 // (8 << 20),
        chunks=chunks, written=offset, host_id=host, now=NOW,
    )  # fmt: skip


def test_an_attempt_s_checkpoints_add_up_and_a_later_attempt_s_first_replaces_them() -> None:
    image = disk()
    first = image.claim(op_id="create", stage=0, host_id="a", now=NOW)
    save(image, first, 1 << 20, h(0))
    save(image, first, 3 << 20, h(1) + h(2))
    op = image.operation("create")
    assert op is not None
    assert op.checkpoint(0) == Checkpoint(first, 3 << 20, h(0) + h(1) + h(2))
    assert op.percent == 37

    second = image.claim(op_id="create", stage=0, host_id="b", now=NOW)
    save(image, second, 4 << 20, h(0) + h(1) + h(2) + h(3), host="b")  # resumed: all so far
    checkpoint = op.checkpoint(0)
    assert checkpoint is not None and checkpoint.epoch == second
    assert checkpoint.chunks == h(0) + h(1) + h(2) + h(3)
    twin = folded_state.decode(folded_state.encode(image, None))[0].operation("create")
    assert twin is not None and twin.checkpoint(0) == checkpoint

    image.complete(op_id="create", stage=0, epoch=second, host_id="b", now=NOW)
    assert op.checkpoint(0) is None and op.checkpoint_chunks == b""


def test_a_checkpoint_from_a_host_whose_claim_moved_on_or_going_back_is_refused() -> None:
    image = disk()
    first = image.claim(op_id="create", stage=0, host_id="a", now=NOW)
    save(image, first, 2 << 20, h(0) + h(1))
    with pytest.raises(InvalidParameter):
        save(image, first, 1 << 20, h(0))  # behind the last one
    with pytest.raises(InvalidParameter):
        save(image, first, 3 << 20, b"short")  # not 32-byte hashes
    image.claim(op_id="create", stage=0, host_id="b", now=NOW)
    with pytest.raises(ClaimLost):
        save(image, first, 3 << 20, h(2))
