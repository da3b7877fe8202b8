"""Event state as msgpack bytes, with eventsourcing's transcodings for types msgpack lacks.

The document shape is the one eventsourcing's ``JSONTranscoder`` writes: an object of a
registered type becomes the map ``{"_type_": name, "_data_": encoded}``, decoded inner maps
first. Only the bytes differ (msgpack, so ``bytes`` values stay bytes and maps keep int keys).

An :class:`~engine.opaque.Opaque` (user data) is not a transcoding: its bytes, packed already,
go in an ext type of their own and come back as an ``Opaque``, never decoded here, so nothing
in them is taken for a wrapper (docs/adr/0015-user-data-is-opaque.md).

Types are matched exactly (msgpack's ``strict_types``), so a ``tuple``, or a subclass of
``str``, ``int``, ``dict`` or ``list``, is never silently flattened into its base type: it needs
a registered transcoding, as an unknown class does, and round-trips as itself. The one exception
is a ``StrEnum`` member (a stage's kind, an operation's purpose), which *is* its string: it is
written as that string, byte for byte, and read back as the plain string, which it equals
(docs/adr/0021-typed-stages-and-enums.md).

Imports: ``engine.opaque``, eventsourcing, msgpack; the standard library.
"""

from __future__ import annotations

import threading
from enum import StrEnum
from typing import Any

import msgpack
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    Transcoder,
    Transcoding,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)

from engine.opaque import EXT_CODE, Opaque


def _decode_ext(code: int, data: bytes) -> Any:
    if code == EXT_CODE:
        return Opaque(data)
    return msgpack.ExtType(code, data)  # what msgpack gives without a hook


class TupleAsList(Transcoding):
    type = tuple
    name = "tuple_as_list"

    def encode(self, obj: tuple[Any, ...]) -> list[Any]:
        return list(obj)

    def decode(self, data: list[Any]) -> tuple[Any, ...]:
        return tuple(data)


class MsgpackTranscoder(Transcoder):
    """An eventsourcing ``Transcoder`` that writes msgpack; register transcodings as usual."""

    def __init__(self) -> None:
        self.types: dict[type, Transcoding] = {}
        self.names: dict[str, Transcoding] = {}
        self._packers = threading.local()  # each thread's idle Packer, if it has one

    def register(self, transcoding: Transcoding) -> None:
        self.types[transcoding.type] = transcoding
        self.names[transcoding.name] = transcoding

    def encode(self, obj: Any) -> bytes:
        # A Packer keeps a buffer, so it is never shared by two threads, nor reused by a
        # transcoding that encodes from inside an encode. Reusing one saves allocating its
        # 256 KiB buffer per event: more than half the cost of packb on a cold cache.
        local = self._packers
        packer = getattr(local, "packer", None)
        if packer is None:
            packer = msgpack.Packer(default=self._encode_obj, use_bin_type=True, strict_types=True)
        else:
            local.packer = None  # in use
        try:
            data: bytes = packer.pack(obj)  # the buffer is reset even when this raises
        finally:
            local.packer = packer
        return data

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data,
            object_hook=self._decode_obj,
            ext_hook=_decode_ext,
            raw=False,
            strict_map_key=False,
            use_list=True,
        )

    def _encode_obj(self, obj: Any) -> dict[str, Any] | msgpack.ExtType | str:
        try:
            transcoding = self.types[type(obj)]
        except KeyError:
            if type(obj) is Opaque:  # rare enough (user data) to come after the transcodings
                return msgpack.ExtType(EXT_CODE, obj.packed)
            if isinstance(obj, StrEnum):
                return obj.value
            # The same words as JSONTranscoder's, so callers see one message whichever is used.
            msg = (
                f"Object of type {type(obj)} is not serializable. Please define and register "
                "a custom transcoding for this type."
            )
            raise TranscodingNotRegisteredError(msg) from None
        return {"_type_": transcoding.name, "_data_": transcoding.encode(obj)}

    def _decode_obj(self, d: dict[Any, Any]) -> Any:
        if len(d) != 2 or "_type_" not in d or "_data_" not in d:
            return d
        name = d["_type_"]
        try:
            transcoding = self.names[name]
        except (KeyError, TypeError) as e:  # TypeError: an unhashable _type_ value
            msg = (
                f"Data serialized with name '{name}' is not deserializable. Please register a "
                "custom transcoding for this type."
            )
            raise TranscodingNotRegisteredError(msg) from e
        return transcoding.decode(d["_data_"])


def default_transcoder() -> MsgpackTranscoder:
    """The transcoder Strata's applications use: UUID, Decimal, datetime and tuple built in."""
    transcoder = MsgpackTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO(), TupleAsList()):
        transcoder.register(transcoding)
    return transcoder
