"""User data is data (architecture §6): whatever a caller stores comes back exactly, through the
transcoder, the log, another host's replay and the read model, and nothing in it is ever taken
for the transcoder's ``{"_type_": ..., "_data_": ...}`` wrapper."""

from __future__ import annotations

import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings

from engine import validation
from engine.log.reader import ReadOnlyLog
from engine.opaque import Opaque, value_of
from engine.persistence.transcoder import default_transcoder
from engine.projections import log_events
from tests.persistence.user_data_values import USER_DATA, exact
from tests.projections.projection_log import Repo

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@given(value=USER_DATA)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_user_data_comes_back_exactly_from_the_transcoder(value: Any) -> None:
    codec = default_transcoder()
    state = {"timestamp": NOW, "user_data": validation.user_data(value), "origin": {"a": 1}}
    decoded = codec.decode(codec.encode(state))
    assert exact(value_of(decoded["user_data"])) == exact(value)
    assert decoded["timestamp"] == NOW  # the state's own wrappers are still decoded


def test_a_wrapper_in_user_data_is_left_alone() -> None:
    codec = default_transcoder()
    for value in (
        {"_type_": "no_such", "_data_": 1},
        {"_type_": "uuid_hex", "_data_": uuid.UUID(int=7).hex},
        {"_type_": "decimal_str", "_data_": "1.5"},
        [{"deep": {"_data_": [1, 2], "_type_": "tuple_as_list"}}],
    ):
        decoded = codec.decode(codec.encode({"user_data": validation.user_data(value)}))
        assert decoded["user_data"] == Opaque(exact(value))
        assert value_of(decoded["user_data"]) == value


@given(first=USER_DATA, second=USER_DATA)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_user_data_comes_back_exactly_from_the_log_on_another_host(first: Any, second: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "log"
        writer = Repo(log_dir)
        image_id = writer.disk(user_data=validation.user_data(first))
        writer.service.update(
            image_id,
            lambda i: i.set_user_data(
                user_data=validation.user_data(second), host_id="host-a", now=NOW
            ),
        )
        writer.app.close()

        reader = Repo(log_dir, "host-b", create=False)
        try:
            assert exact(value_of(reader.get(image_id).user_data)) == exact(second)
            # The view, folded from the log, then reloaded from its read model's blobs.
            db_path = Path(tmp) / "view.db"
            reader.view(db_path).close()
            reloaded = reader.view(db_path)
            image = reloaded.image(image_id)
            assert image is not None
            assert exact(value_of(image.user_data)) == exact(second)
            reloaded.close()
        finally:
            reader.app.close()
        events = replayed_events(str(log_dir), image_id)
        assert [exact(value_of(e.user_data)) for e in events] == [exact(first), exact(second)]


def replayed_events(log_dir: str, image_id: uuid.UUID) -> list[Any]:
    """The image's events with user data, as replay makes them."""
    records = list(ReadOnlyLog(log_dir).records())
    events = log_events.records_decoder(log_events.new_mapper())(records)
    return [e for e in events if e.originator_id == image_id and hasattr(e, "user_data")]


@pytest.mark.parametrize("value", [None, {}, [], 0, "", b""], ids=repr)
def test_empty_user_data_is_kept_as_given(value: Any) -> None:
    codec = default_transcoder()
    decoded = codec.decode(codec.encode({"user_data": validation.user_data(value)}))
    assert exact(value_of(decoded["user_data"])) == exact(value)


def test_an_ext_type_that_is_not_user_data_decodes_as_msgpack_gives_it() -> None:
    codec = default_transcoder()
    assert codec.decode(msgpack.packb({"x": msgpack.ExtType(5, b"ab")})) == {
        "x": msgpack.ExtType(5, b"ab")
    }


def test_the_value_handed_back_is_a_fresh_copy() -> None:
    opaque = validation.user_data({"list": [1, 2]})
    assert opaque is not None
    handed = value_of(opaque)
    handed["list"].append(3)  # a caller changing what it got changes nothing stored
    assert value_of(opaque) == {"list": [1, 2]}


def test_an_ext_value_an_older_version_took_as_user_data_comes_back_as_it_was() -> None:
    # Before user data was opaque, validation let msgpack's ExtType through, and the log kept it.
    old = msgpack.ExtType(1, b"\xc1 not msgpack")
    decoded = default_transcoder().decode(msgpack.packb({"user_data": old}))
    assert value_of(decoded["user_data"]) == old
