"""Replay's mapper decodes a log record exactly as eventsourcing's own mapper decodes it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from eventsourcing.persistence import (
    Mapper,
    MapperDeserialisationError,
    TranscodingNotRegisteredError,
)
from eventsourcing.utils import TopicError
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.aggregates.image import Image
from engine.log.framing import Record, key_of
from engine.persistence.transcoder import default_transcoder
from engine.projections.log_events import new_mapper, record_decoder, to_event

NOW = datetime(2026, 11, 21, tzinfo=UTC)

# Values the transcoder must bring back as themselves, nested anywhere in an event.
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=8),
    st.sampled_from(["_type_", "_data_", "uuid_hex", "\u00a6_type_"]),
    st.binary(max_size=8),
    st.uuids(),
    st.datetimes(timezones=st.just(UTC)),
    st.decimals(allow_nan=False, allow_infinity=False),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["_type_", "_data_"]), inner, max_size=3
        ).filter(lambda d: set(d) != {"_type_", "_data_"}),  # that map is the transcoder's own
    ),
    max_leaves=12,
)


def record_of(mapper: Mapper[Any], event: Any) -> Record:
    stored = mapper.to_stored_event(event)
    return Record(
        1, b"", event.host_id, 0, True, key_of(stored.originator_id),
        stored.originator_version, stored.topic, stored.state,
    )  # fmt: skip


def image_events(user_data: Any, snapshot_id: uuid.UUID | None) -> list[Image.Event]:
    image_id = uuid.uuid4()
    common: dict[str, Any] = {"timestamp": NOW, "host_id": "host-a"}
    return [
        Image.ImageRequested(
            originator_id=image_id, originator_version=1, kind="virtual-disk", size=1,
            chain=["a"], user_data=user_data, strategy="space", auto_fix=True,
            origin={"how": user_data},
            # Not a plan the engine makes: any value must replay as it was stored.
            operations=[{"op_id": "x", "stages": [user_data]}],  # type: ignore[typeddict-item]
            **common,
        ),
        Image.SnapshotTaken(
            originator_id=image_id, originator_version=2, snapshot_id=snapshot_id,
            chain=["a", "b"], operations=[], **common,
        ),
        Image.UserDataSet(originator_id=image_id, originator_version=3, user_data=user_data,
                          **common),
        Image.ImageRemoved(originator_id=image_id, originator_version=4, reason="r", **common),
    ]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(user_data=_values, snapshot_id=st.none() | st.uuids())
def test_an_event_decodes_as_the_library_s_mapper_decodes_it(
    user_data: Any, snapshot_id: uuid.UUID | None
) -> None:
    library: Mapper[Any] = Mapper(default_transcoder())
    replay = new_mapper()
    for event in image_events(user_data, snapshot_id):
        record = record_of(library, event)
        expected = library.to_domain_event(library.to_stored_event(event))
        for decoded in (to_event(replay, record), to_event(library, record)):
            assert type(decoded) is type(expected)
            assert vars(decoded) == vars(expected) == vars(event)


def test_an_event_of_an_older_class_version_is_upcast() -> None:
    mapper = new_mapper()
    [*_, removed] = image_events(None, None)
    record = record_of(mapper, removed)
    state = msgpack.unpackb(record.state, raw=False)
    del state["class_version"], state["reason"]  # as version 1 wrote it
    old = record._replace(state=msgpack.packb(state, use_bin_type=True))
    assert to_event(mapper, old).reason == ""
    assert vars(to_event(mapper, old)) == vars(Mapper(default_transcoder()).to_domain_event(
        mapper.to_stored_event(removed)
    )) | {"reason": ""}  # fmt: skip


@pytest.mark.parametrize("decoder", ["replay", "library"])
def test_a_record_that_does_not_decode_raises_the_library_s_errors(decoder: str) -> None:
    mapper = new_mapper() if decoder == "replay" else Mapper(default_transcoder())
    decode = record_decoder(mapper)
    record = record_of(mapper, image_events(None, None)[0])
    with pytest.raises(TopicError):
        decode(record._replace(topic="strata.image.NoSuchEvent"))
    with pytest.raises(MapperDeserialisationError, match="originator_version 1: "):
        decode(record._replace(state=b"\xc1"))
    unknown = msgpack.packb({"when": {"_type_": "no_such_type", "_data_": 1}})
    with pytest.raises(MapperDeserialisationError, match="no_such_type") as raised:
        decode(record._replace(state=unknown))
    assert isinstance(raised.value.__cause__, TranscodingNotRegisteredError)


def test_decimal_and_datetime_values_come_back_as_themselves() -> None:
    mapper = new_mapper()
    [requested, *_] = image_events({"price": Decimal("1.5"), "at": NOW}, None)
    decoded = to_event(mapper, record_of(mapper, requested))
    assert decoded.user_data == {"price": Decimal("1.5"), "at": NOW}
    assert type(decoded.user_data["price"]) is Decimal
