"""The msgpack transcoder passes eventsourcing's transcoder contract and writes the same documents
as the library's JSONTranscoder, in msgpack bytes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import msgpack
import pytest
from eventsourcing.persistence import Transcoding, UUIDAsHex

# The module, not its classes: pytest would collect an imported TestCase class as a test too.
from eventsourcing.tests import persistence as contract
from eventsourcing.tests.persistence import (
    CustomType1,
    CustomType1AsDict,
    CustomType2,
    CustomType2AsDict,
    MyClass,
    Mydict,
    MyInt,
    MyList,
    MyStr,
)

from engine.persistence.transcoder import MsgpackTranscoder, TupleAsList, default_transcoder


class MydictAsDict(Transcoding):
    type = Mydict
    name = "mydict"

    def encode(self, obj: Mydict[Any, Any]) -> dict[Any, Any]:
        return dict(obj)

    def decode(self, data: dict[Any, Any]) -> Mydict[Any, Any]:
        return Mydict(data)


class MyListAsList(Transcoding):
    type = MyList
    name = "mylist"

    def encode(self, obj: MyList[Any]) -> list[Any]:
        return list(obj)

    def decode(self, data: list[Any]) -> MyList[Any]:
        return MyList(data)


class MyStrAsStr(Transcoding):
    type = MyStr
    name = "mystr"

    def encode(self, obj: MyStr) -> str:
        return str(obj)

    def decode(self, data: str) -> MyStr:
        return MyStr(data)


class MyIntAsInt(Transcoding):
    type = MyInt
    name = "myint"

    def encode(self, obj: MyInt) -> int:
        return int(obj)

    def decode(self, data: int) -> MyInt:
        return MyInt(data)


def _document(data: bytes) -> Any:
    """The msgpack document as plain data, to compare with what JSONTranscoder would write."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class TestMsgpackTranscoder(contract.TranscoderTestCase):
    """The library's contract. Six of its tests compare encoded bytes with JSON text; those are
    overridden below to compare the msgpack document with the same JSON document instead, and
    keep every round-trip assertion."""

    def construct_transcoder(self) -> MsgpackTranscoder:
        transcoder = MsgpackTranscoder()
        for transcoding in (
            CustomType1AsDict(),
            CustomType2AsDict(),
            UUIDAsHex(),
            TupleAsList(),
            MydictAsDict(),
            MyListAsList(),
            MyStrAsStr(),
            MyIntAsInt(),
        ):
            transcoder.register(transcoding)
        return transcoder

    def test_str(self) -> None:
        """The base test expects JSON text (b'"a"') and decodes legacy JSON escapes; msgpack
        writes a str object, so check that document and the round trip of the same strings."""
        for obj in ["a", "abc", "a'b", 'a"b', "🐈 哈哈"]:
            data = self.transcoder.encode(obj)
            self.assertEqual(_document(data), obj)
            self.assertEqual(self.transcoder.decode(data), obj)
        self.assertEqual(self.transcoder.encode("🐈 哈哈")[1:], "🐈 哈哈".encode())

    def test_dict(self) -> None:
        """The base test compares with JSON text; compare with the same JSON document."""
        for text in [b"{}", b'{"a":1}', b'{"a":1,"b":2}', b'{"a":{}}', b'{"a":{},"b":{}}']:
            obj = json.loads(text)
            data = self.transcoder.encode(obj)
            self.assertEqual(_document(data), obj)
            self.assertEqual(self.transcoder.decode(data), obj)
        obj = {"a": {"b": {"c": 1}}}
        self.assertEqual(self.transcoder.decode(self.transcoder.encode(obj)), obj)

    def test_dict_subclass(self) -> None:
        """The base test compares with JSON text; compare with the same JSON document."""
        my_dict = Mydict({"a": 1})
        data = self.transcoder.encode(my_dict)
        self.assertEqual(_document(data), json.loads(b'{"_type_":"mydict","_data_":{"a":1}}'))
        self.assertEqual(self.transcoder.decode(data), my_dict)

    def test_tuple(self) -> None:
        """The base test compares the empty tuple with JSON text; compare with the same JSON
        document, then run the base test's round trips."""
        data = self.transcoder.encode(())
        self.assertEqual(_document(data), json.loads(b'{"_type_":"tuple_as_list","_data_":[]}'))
        for obj in [(), ((),), ((1, 2),), (("a", "b"),), ((1, "a"),)]:
            self.assertEqual(self.transcoder.decode(self.transcoder.encode(obj)), obj)

    def test_nested_custom_type(self) -> None:
        """The base test compares with JSON text; compare with the same JSON document."""
        obj = CustomType2(CustomType1(UUID("b2723fe2c01a40d2875ea3aac6a09ff5")))
        data = self.transcoder.encode(obj)
        expect = (
            b'{"_type_":"custom_type2_as_dict","_data_":'
            b'{"_type_":"custom_type1_as_dict","_data_":'
            b'{"_type_":"uuid_hex","_data_":"b2723fe2c01'
            b'a40d2875ea3aac6a09ff5"}}}'
        )
        self.assertEqual(_document(data), json.loads(expect))
        copy = self.transcoder.decode(data)
        self.assertIsInstance(copy, CustomType2)
        self.assertIsInstance(copy.value, CustomType1)
        self.assertEqual(copy.value.value, obj.value.value)

    def test_custom_type_error(self) -> None:
        """The base test decodes JSON text naming an unknown transcoding; decode the same
        document in msgpack. The messages are the library's, word for word."""
        not_serializable = (
            "Object of type <class 'eventsourcing.tests.persistence.MyClass'> is not "
            "serializable. Please define and register a custom transcoding for this type."
        )
        for obj in [MyClass(), {"a": MyClass()}]:
            with self.assertRaises(TypeError) as cm:
                self.transcoder.encode(obj)
            self.assertEqual(cm.exception.args[0], not_serializable)

        data = msgpack.packb({"_type_": "custom_type3_as_dict", "_data_": ""})
        with self.assertRaises(TypeError) as cm:
            self.transcoder.decode(data)
        self.assertEqual(
            cm.exception.args[0],
            "Data serialized with name 'custom_type3_as_dict' is not deserializable. Please "
            "register a custom transcoding for this type.",
        )


def test_event_state_with_bytes_ids_times_and_amounts_round_trips_unchanged() -> None:
    transcoder = default_transcoder()
    state = {
        "blob": b"\x00\xff raw bytes",
        "image_id": uuid4(),
        "at": datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC),
        "ratio": Decimal("0.125"),
        "chain": ("base", "top"),
        "sizes": {1: 512, 2: 4096},
    }
    assert transcoder.decode(transcoder.encode(state)) == state


def test_state_is_more_compact_than_the_same_state_in_json() -> None:
    state = {"image_id": uuid4().hex, "size": 10 * 2**30, "user_data": {"name": "web01"}}
    assert len(default_transcoder().encode(state)) < len(json.dumps(state).encode())


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


class PointAsInt(Transcoding):
    type = Point
    name = "point"

    def encode(self, obj: Point) -> int:
        return obj.x

    def decode(self, data: int) -> Point:
        return Point(data)


def test_a_transcoding_registered_after_the_transcoder_was_made_is_decoded() -> None:
    codec = default_transcoder()
    data = msgpack.packb({"p": [{"_type_": "point", "_data_": 3}]})
    with pytest.raises(Exception, match="'point' is not deserializable"):
        codec.decode(data)

    codec.register(PointAsInt())

    assert codec.decode(data) == {"p": [Point(3)]}
