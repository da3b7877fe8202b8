"""The transcoder reuses a msgpack Packer per thread; its bytes must be those of a fresh one."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import Transcoding
from hypothesis import given
from hypothesis import strategies as st

from engine.persistence.transcoder import MsgpackTranscoder, default_transcoder

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.uuids(),
    st.datetimes(timezones=st.just(UTC)),
    st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: Decimal(str(d))),
)
documents = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)


class Unregistered:
    pass


def fresh_encoding(document: Any) -> bytes:
    """The first encode of a new transcoder, which builds its Packer for that call."""
    return default_transcoder().encode(document)


@given(documents, documents, st.booleans())
def test_an_encoding_after_others_and_after_a_failure_is_that_of_a_fresh_transcoder(
    first: Any, second: Any, fail_in_between: bool
) -> None:
    transcoder = default_transcoder()
    transcoder.encode(first)
    if fail_in_between:
        with pytest.raises(TypeError):  # the library's TranscodingNotRegisteredError
            transcoder.encode([first, Unregistered()])
    assert transcoder.encode(second) == fresh_encoding(second)


def test_threads_encoding_at_once_each_get_their_own_bytes() -> None:
    transcoder = default_transcoder()
    docs = [
        {"thread": n, "at": datetime(2026, 1, 1, n, tzinfo=UTC), "note": "x" * (n * 37)}
        for n in range(8)
    ]
    expected = [fresh_encoding(doc) for doc in docs]
    wrong: list[int] = []

    def encode_many(n: int) -> None:
        for _ in range(500):
            if transcoder.encode(docs[n]) != expected[n]:
                wrong.append(n)

    threads = [threading.Thread(target=encode_many, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


class Envelope:
    def __init__(self, inner: Any) -> None:
        self.inner = inner


class EnvelopeAsBytes(Transcoding):
    """A transcoding that encodes its contents from inside the transcoder's own encode."""

    type = Envelope
    name = "envelope"

    def __init__(self, transcoder: MsgpackTranscoder) -> None:
        self.transcoder = transcoder

    def encode(self, obj: Envelope) -> bytes:
        return self.transcoder.encode(obj.inner)

    def decode(self, data: bytes) -> Envelope:
        return Envelope(self.transcoder.decode(data))


def test_a_transcoding_that_encodes_while_encoding_gets_a_packer_of_its_own() -> None:
    transcoder = default_transcoder()
    transcoder.register(EnvelopeAsBytes(transcoder))
    transcoder.encode("this thread now has a Packer")
    inner = {"id": UUID(int=7), "sizes": (1, 2, 3)}
    data = transcoder.encode({"outer": Envelope(inner), "after": "the nested encode"})
    decoded = transcoder.decode(data)
    assert decoded["after"] == "the nested encode"
    assert decoded["outer"].inner == inner
