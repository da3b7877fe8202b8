"""A group commit's framing writes exactly the framing module's bytes, and refuses a request
alone.

``engine/log/batch.py``'s ``frame_batch`` frames a whole group inline, without a ``Record`` per
event; each frame must still be ``frame(encode_payload(record))``, chained by ``digest``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from engine.errors import StrataError
from engine.log import batch as batch_module
from engine.log import framing
from engine.log.batch import EventToAppend, NewEvent
from engine.log.group_commit import Request


def test_the_frames_are_the_framing_modules() -> None:
    events = [NewEvent(uuid.UUID(int=7), 1, "t", b"s"), NewEvent("k", 4, "u", b"")]
    framed = batch_module.frame_batch(
        [Request(events)],
        seq=3,
        prev=framing.ZERO_HASH,
        base=0,
        host_id="h",
        now=5,
        versions={"k": [3, [1]]},
        pack=framing.new_packer().pack,
    )
    prev, expected = framing.ZERO_HASH, b""
    for i, event in enumerate(events):
        key = framing.key_of(event.originator_id)
        record = framing.Record(
            3 + i, prev, "h", 5, i == 1, key, event.originator_version, event.topic, event.state
        )
        framed_record = framing.frame(framing.encode_payload(record))
        expected += framed_record
        prev = framing.digest(framed_record)
    assert bytes(framed.out) == expected
    assert framed.last_hash == prev


def test_a_record_over_the_limit_is_refused_alone() -> None:
    big = b"\0" * (framing.MAX_PAYLOAD + 1)
    batch: list[Request[Sequence[EventToAppend]]] = [
        Request([NewEvent("a", 1, "t", b"x")]),
        Request([NewEvent("b", 1, "t", big)]),
        Request([NewEvent("c", 1, "t", b"")]),
    ]
    framed = batch_module.frame_batch(
        batch,
        seq=1,
        prev=b"\x5a" * 32,
        base=4096,
        host_id="h",
        now=1,
        versions={},
        pack=framing.new_packer().pack,
    )
    assert [batch.index(request) for request, _, _ in framed.accepted] == [0, 2]
    assert batch[0].error is None and batch[2].error is None
    assert isinstance(batch[1].error, StrataError)
