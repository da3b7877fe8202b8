"""The compiled group framing writes exactly the bytes the Python loop writes, and the compiled
index update records what the Python one records.

``engine/log/batch.py``'s ``_frame_batch`` is the reference; ``engine/log/_fastscan.c``'s
``frame_batch`` frames the same requests in C and packs a record with a field of an uncommon
type by calling the Packer. Both get the same groups (several requests of several events,
UUID and str keys, non-ASCII text, ints of every msgpack width and beyond, empty and large
states, version conflicts anywhere in a group) and must return the same frames, offsets,
accepted requests, claims, chain, request errors, and raise the same errors.
"""

from __future__ import annotations

import copy
import uuid
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import StrataError
from engine.log import batch as batch_module
from engine.log import framing
from engine.log.batch import EventToAppend, NewEvent
from engine.log.group_commit import Request

compiled = batch_module.compiled_frame_batch
pytestmark = pytest.mark.skipif(compiled is None, reason="engine/log/_fastscan is not built")

IDS: list[uuid.UUID | str] = [
    uuid.UUID(int=1),
    uuid.UUID("0d6b4d6e-2b53-4d7a-9b25-1f1b7e7a5c11"),
    "volume/ünïcødé-é",
    "k",
    "x" * 40,
]


class SubUUID(uuid.UUID):
    pass


class SubStr(str):
    pass


texts = st.one_of(
    st.sampled_from(["", "t", "strata.Volume.Created", "é" * 20, "界" * 100, "a" * 300]),
    st.text(max_size=40),
)
ints = st.one_of(
    st.integers(0, 300),
    st.sampled_from(
        [127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    ),
    st.integers(-(2**63), 2**64 + 5),
)
states = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([0, 31, 255, 256, 65535, 65536, 70000]).map(lambda n: b"\xa7" * n),
)


@st.composite
def an_event(draw: st.DrawFn) -> Any:
    oid = draw(st.sampled_from(IDS))
    kind = draw(
        st.sampled_from(["plain"] * 40 + ["subclass"] * 2 + ["bytearray"] * 2 + ["surrogate"])
    )
    topic = draw(texts)
    state: Any = draw(states)
    if kind == "subclass":
        oid = SubUUID(int=oid.int) if isinstance(oid, uuid.UUID) else SubStr(oid)
    elif kind == "bytearray":
        state = bytearray(state)
    elif kind == "surrogate":
        topic = topic + "\udc80"
    version = draw(st.one_of(st.integers(0, 4), ints))
    return NewEvent(oid, version, topic, state)


@st.composite
def a_group(draw: st.DrawFn) -> tuple[list[list[Any]], dict[bytes | str, list[Any]], int, int]:
    versions: dict[bytes | str, list[Any]] = {}
    for oid in draw(st.lists(st.sampled_from(IDS), unique=True)):
        versions[framing.key_of(oid)] = [draw(st.integers(0, 3)), [1]]
    requests = draw(st.lists(st.lists(an_event(), min_size=1, max_size=4), max_size=6))
    # Mostly acceptable: each event the next version of its aggregate.
    claimed = {key: entry[0] for key, entry in versions.items()}
    for events in requests:
        for k, event in enumerate(events):
            if draw(st.integers(0, 5)):
                key = framing.key_of(event.originator_id)
                version = claimed.get(key, -1) + 1
                events[k] = event._replace(originator_version=version)
                claimed[key] = version
    return requests, versions, draw(ints), draw(ints)


def run(
    frame: Callable[..., Any] | None,
    requests: list[list[Any]],
    versions: dict[bytes | str, list[Any]],
    seq: int,
    now: int,
) -> tuple[object, list[tuple[type[BaseException], str, Any] | None]]:
    """What framing (and then indexing) a batch gave, and each request's error."""
    saved = batch_module.fast_frame_batch, batch_module.fast_index_batch
    batch_module.fast_frame_batch = frame
    batch_module.fast_index_batch = None if frame is None else batch_module.compiled_index_batch
    batch: list[Request[Sequence[EventToAppend]]] = [Request(list(events)) for events in requests]
    before = repr(versions)
    try:
        framed = batch_module.frame_batch(
            batch,
            seq=seq,
            prev=b"\x5a" * 32,
            base=4096,
            host_id="höst-a",
            now=now,
            versions=versions,
            pack=framing.new_packer().pack,
        )
        result: object = (
            bytes(framed.out),
            type(framed.out),
            framed.offsets,
            [(batch.index(r), first, claims) for r, first, claims in framed.accepted],
            framed.next_seq,
            framed.last_hash,
        )
        assert repr(versions) == before  # framing only reads the versions on disk
        # Then, once durable, the index: the versions and sequence numbers it records.
        indexed = copy.deepcopy(versions)
        batch_module.index_batch(framed.accepted, indexed)
        result = (result, indexed, [r.seqs for r in batch])
    except Exception as e:
        result = ("raised", type(e), str(e))
    finally:
        batch_module.fast_frame_batch, batch_module.fast_index_batch = saved
    assert repr(versions) == before
    errors = [
        None if r.error is None else (type(r.error), str(r.error), getattr(r.error, "fields", None))
        for r in batch
    ]
    return result, errors


@settings(max_examples=400, deadline=None)
@given(a_group())
def test_compiled_frames_what_python_frames(group: Any) -> None:
    requests, versions, seq, now = group
    assert run(compiled, requests, versions, seq, now) == run(None, requests, versions, seq, now)


def test_the_frames_are_the_framing_modules() -> None:
    """The reference itself: each frame is frame(encode_payload(record)), chained by digest."""
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
    for frame in (compiled, None):
        requests = [
            [NewEvent("a", 1, "t", b"x")],
            [NewEvent("b", 1, "t", big)],
            [NewEvent("c", 1, "t", b"")],
        ]
        result, errors = run(frame, requests, {}, 1, 1)
        assert isinstance(result, tuple) and [i for i, _, _ in result[0][3]] == [0, 2]
        assert errors[0] is None and errors[2] is None
        assert errors[1] is not None and issubclass(errors[1][0], StrataError)


@given(st.binary(max_size=300))
def test_crc32_is_zlibs(data: bytes) -> None:
    from engine.log._fastscan import crc32

    assert crc32(data) == zlib.crc32(data)
