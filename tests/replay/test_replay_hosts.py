"""Replay counts each host's records and keeps each image's last claim, batch after batch."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.aggregates.image import Image
from engine.log.framing import Record
from engine.projections.log_events import new_mapper
from engine.projections.point_in_time import HostSeen, Replay, _note_hosts_and_claims
from engine.projections.view import RepositoryView

_TOPICS = [Image.StageClaimed.TOPIC, Image.StageCompleted.TOPIC, Image.StageProgressed.TOPIC]


def one_by_one(records: list[Record]) -> tuple[dict[str, HostSeen], dict[bytes | str, Record]]:
    """What the counts and claims mean, a record at a time."""
    hosts: dict[str, HostSeen] = {}
    claims: dict[bytes | str, Record] = {}
    for r in records:
        seen = hosts.setdefault(r.host_id, HostSeen(r.host_id, 0, r.seq, r.time_ns))
        seen.records += 1
        seen.last_seq, seen.last_time_ns = r.seq, r.time_ns
        if r.topic == Image.StageClaimed.TOPIC:
            claims[r.originator_key] = r
    return hosts, claims


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("abc"), st.sampled_from(_TOPICS), st.binary(min_size=1, max_size=1)
        ),
        max_size=40,
    ),
    st.lists(st.integers(0, 40), max_size=4),
)
def test_counts_and_claims_are_those_of_the_records_one_by_one(
    rows: list[tuple[str, str, bytes]], cuts: list[int]
) -> None:
    records = [
        Record(seq, b"", host, 1000 + seq, True, key, 1, topic, b"")
        for seq, (host, topic, key) in enumerate(rows, start=1)
    ]
    result = Replay(RepositoryView(None, mapper=new_mapper()), log_began_ns=0)
    bounds = [0, *sorted(min(c, len(records)) for c in cuts), len(records)]
    for lo, hi in pairwise(bounds):
        _note_hosts_and_claims(result, records[lo:hi])
    assert (result.hosts, result._claims) == one_by_one(records)
