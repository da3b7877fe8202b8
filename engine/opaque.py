"""A caller's value that the engine carries but never looks into: user data (architecture §6).

An :class:`Opaque` holds the value already packed by msgpack. The transcoder stores those bytes
as they are, in an ext type of their own, and reads them back as an ``Opaque`` without decoding
them, so no key or shape inside (``_type_``/``_data_`` maps included) is ever interpreted, and
a replay pays for a copy of the bytes, not for decoding the value. The value is unpacked only
when a caller asks for it, plainly (no hooks), a fresh copy each time.

Imports nothing of the engine: the aggregates, validation and persistence all use it.
See docs/adr/0015-user-data-is-opaque.md.

Imports: msgpack; the standard library.
"""

from __future__ import annotations

from typing import Any

import msgpack

EXT_CODE = 1  # the msgpack ext type that holds an Opaque's bytes in an event's state


class Opaque:
    """A value packed by msgpack; equal to another when their bytes are (NaN included)."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        self.packed = packed

    @property
    def value(self) -> Any:
        try:
            return msgpack.unpackb(self.packed, raw=False, strict_map_key=False, use_list=True)
        except (ValueError, TypeError):  # TypeError: a map key Python cannot hash
            # Not bytes validation packed: an ExtType that a version before ADR 0015 took as
            # user data, which that version handed back as it is. So does this one.
            return msgpack.ExtType(EXT_CODE, self.packed)

    def __eq__(self, other: object) -> bool:
        return type(other) is Opaque and other.packed == self.packed

    def __hash__(self) -> int:
        return hash(self.packed)

    def __repr__(self) -> str:
        return f"Opaque({self.value!r})"


def value_of(data: Any) -> Any:
    """The caller's value: unpacked from an ``Opaque``, or as it is for data that never was
    one (None, and user data of events written before user data was opaque)."""
    return data.value if type(data) is Opaque else data


def json_ready(value: Any) -> Any:
    """``value`` with the dict keys JSON cannot hold (bytes) made text, for the places that
    show user data as JSON (the read model's column, ``strata-log export``)."""
    if type(value) is dict:
        return {
            key if type(key) is not bytes else repr(key): json_ready(item)
            for key, item in value.items()
        }
    if type(value) is list:
        return [json_ready(item) for item in value]
    return value
