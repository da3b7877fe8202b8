"""A ``StrEnum`` member (a stage's kind, an operation's purpose or state) is written as its
string, byte for byte, and read back as that plain string (docs/adr/0021-typed-stages-and-enums.md);
any other subclass of ``str`` still needs a transcoding."""

from __future__ import annotations

import uuid

import msgpack
import pytest
from eventsourcing.persistence import TranscodingNotRegisteredError

from engine import planning
from engine.aggregates import operations as ops
from engine.aggregates.stage_kinds import StageKind
from engine.persistence.transcoder import default_transcoder


class Label(str):
    pass


def plain(value: object) -> object:
    """The same value with every string a plain ``str``."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return str.__str__(value) if isinstance(value, str) else value


def test_enum_members_are_written_as_the_very_bytes_of_their_strings() -> None:
    transcoder = default_transcoder()
    work = [
        planning.optimize_plan(uuid.uuid4()),
        planning.resize(ops.volume_ref(uuid.uuid4().hex, "qcow2"), 4096),
        {**ops.plan("x", ops.MERGE), "state": ops.FAILED, "do": StageKind.REBASE},
    ]
    assert any(type(plan["purpose"]) is ops.Purpose for plan in work)

    encoded = transcoder.encode(work)

    assert encoded == transcoder.encode(plain(work))
    back = transcoder.decode(encoded)
    assert back == work
    assert all(type(plan["purpose"]) is str for plan in back)


def test_a_fixs_data_and_id_are_the_same_bytes_whether_made_from_members_or_strings() -> None:
    made = [
        ops.plan("x", ops.CLEAN, {"do": "delete", "volumes": []}),
        StageKind.DELETE,
        ops.PENDING,
    ]
    assert msgpack.packb(made) == msgpack.packb(plain(made))


def test_another_subclass_of_str_still_needs_a_transcoding() -> None:
    with pytest.raises(TranscodingNotRegisteredError):
        default_transcoder().encode({"label": Label("x")})
