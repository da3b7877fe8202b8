"""The C loop that makes records into events (engine/projections/_fastevents.c) gives what
ReplayMapper.record_event, its reference, gives: the same events, or the same error."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.aggregates.image import Image
from engine.aggregates.repository import Repository
from engine.log.framing import Record, id_cache, id_of, key_of
from engine.log.reader import ReadOnlyLog
from engine.projections import log_events
from engine.projections.log_events import ReplayMapper, new_mapper

SOURCE = Path(log_events.__file__).with_name("_fastevents.c")
GOLDEN = sorted(Path(__file__).with_name("golden").glob("*/log"))
compiled = pytest.mark.skipif(
    log_events.compiled_build_events is None, reason="the C loop is not built"
)


def golden_records() -> list[Record]:
    return [record for log in GOLDEN for record in ReadOnlyLog(str(log)).records()]


RECORDS = golden_records()


@contextmanager
def c_loop(enabled: bool) -> Iterator[None]:
    """Make events with the C loop or without it (whatever --scanner says)."""
    previous = log_events.build_events
    log_events.build_events = log_events.compiled_build_events if enabled else None
    try:
        yield
    finally:
        log_events.build_events = previous


def decoded(records: list[Record], *, fast: bool) -> list[tuple[str, Any]]:
    """Each record's event as (class name, its attributes in order), or the error it raised
    as ("error", type and message), with a new mapper each time (nothing learnt before)."""
    with c_loop(fast):
        mapper = new_mapper()
        assert isinstance(mapper, ReplayMapper)
        try:
            events = mapper.record_events(records)
        except Exception as e:
            return [("error", f"{type(e).__name__}: {e}")]
        # Twice: the second time the mapper has learnt every topic, so the C loop does more.
        again = mapper.record_events(records)
    made = [(type(e).__qualname__, list(vars(e).items())) for e in events]
    assert made == [(type(e).__qualname__, list(vars(e).items())) for e in again]
    return made


def test_the_c_loop_is_in_use_wherever_its_source_is() -> None:
    # `make` builds it (setup.py); a build that failed quietly (it is optional) shows here.
    assert SOURCE.exists()
    from engine.projections import _fastevents  # noqa: F401  (ImportError: not built)

    assert log_events.compiled_build_events is not None


@compiled
def test_golden_logs_give_the_same_events_both_ways() -> None:
    assert RECORDS, "no golden log"
    topics = {r.topic for r in RECORDS}
    assert Image.ImageRemoved.TOPIC in topics  # its class_version 2 upcasts older states
    assert any(isinstance(r.originator_key, str) for r in RECORDS)  # the repository's id
    assert decoded(RECORDS, fast=True) == decoded(RECORDS, fast=False)
    # Once the topics are known, the C loop leaves Python only the repository's event (a
    # string id) and the removals to upcast.
    mapper = new_mapper()
    assert isinstance(mapper, ReplayMapper) and log_events.compiled_build_events is not None
    with c_loop(True):
        mapper.record_events(RECORDS)
    _, missed = log_events.compiled_build_events(
        RECORDS, mapper._plain_classes, mapper.transcoder.decode, id_cache(), id_of
    )
    assert {RECORDS[i].topic for i in missed} == {
        Image.ImageRemoved.TOPIC,
        Repository.Created.TOPIC,
    }
    assert len(missed) < len(RECORDS) / 5


def odd_records() -> Iterator[Record]:
    """Records the C loop must leave to Python: each is made from a sound one."""
    image = next(r for r in RECORDS if r.topic == Image.ImageRequested.TOPIC)
    state = msgpack.unpackb(image.state)
    yield image._replace(state=b"\xc1")  # msgpack's never-used byte: does not decode
    yield image._replace(state=msgpack.packb([1, 2]))  # not a map
    yield image._replace(state=msgpack.packb({**state, "class_version": "2"}))  # not an int
    yield image._replace(state=msgpack.packb({**state, "class_version": 0}))  # behind
    yield image._replace(topic="strata.image.NoSuchEvent")
    yield image._replace(originator_key="not-a-uuid")


ODD = list(odd_records()) if RECORDS else []


@compiled
@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(range(len(RECORDS) + len(ODD))), max_size=40))
def test_any_mix_of_sound_and_odd_records_gives_the_same_events_or_error(
    picks: list[int],
) -> None:
    pool = RECORDS + ODD
    records = [pool[i] for i in picks]
    assert decoded(records, fast=True) == decoded(records, fast=False)


@compiled
def test_an_image_id_the_cache_has_not_seen_is_made_and_kept() -> None:
    image = next(r for r in RECORDS if r.topic == Image.ImageRequested.TOPIC)
    fresh = uuid.uuid4()
    record = image._replace(originator_key=key_of(fresh))
    mapper = new_mapper()
    assert isinstance(mapper, ReplayMapper)
    with c_loop(True):
        mapper.record_events([image])  # learns the topic
        (event,) = mapper.record_events([record])
    assert event.originator_id == fresh and type(event.originator_id) is uuid.UUID
