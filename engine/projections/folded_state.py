"""An image's folded state as bytes, so a host restarts from its read model instead of the log.

The bytes are a cache of ``Image.apply`` over the log, so they are only valid for the code that
folded them: :data:`SCHEMA` is a fingerprint of the aggregate's source (and of this module's
layout version). When the aggregate changes in any way, the fingerprint changes and the read
model is rebuilt from the log rather than misread.

:func:`clone` gives the view copy-on-write images: an ``Image`` handed to a caller is never
mutated afterwards, so callers on other threads may read it without a lock.

Imports: ``engine.aggregates``, ``engine.persistence``; the standard library.
"""

from __future__ import annotations

import hashlib
import inspect
import uuid
from dataclasses import asdict, fields
from typing import Any

from engine.aggregates import image as image_module
from engine.aggregates import operations as operations_module
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation, OpState
from engine.persistence.transcoder import default_transcoder

LAYOUT_VERSION = 1
_STATES = {state.value: state for state in OpState}  # stored as strings (the transcoder's)
# Attributes that need more than the transcoder (which knows UUID, datetime, Decimal, tuple).
_OPERATIONS, _PREPARED_ON = "operations", "prepared_on"


def _fingerprint() -> str:
    digest = hashlib.blake2b(f"layout {LAYOUT_VERSION}".encode(), digest_size=8)
    for module in (image_module, operations_module):
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):  # no source shipped: fall back to the state's shape
            digest.update(repr(sorted(Image.__annotations__)).encode())
            digest.update(repr([f.name for f in fields(Operation)]).encode())
    return f"{LAYOUT_VERSION}-{digest.hexdigest()}"


SCHEMA = _fingerprint()
_transcoder = default_transcoder()


def to_state(image: Image) -> dict[str, Any]:
    """Every attribute the aggregate's events set, as values the transcoder can encode."""
    state: dict[str, Any] = {}
    for name, value in vars(image).items():
        if name.startswith("_"):
            continue  # uncommitted events, never part of the folded state
        if name == _OPERATIONS:
            value = [asdict(op) for op in value]
        elif name == _PREPARED_ON:
            value = sorted(value)
        state[name] = value
    return state


def from_state(state: dict[str, Any]) -> Image:
    image = Image()
    for name, value in state.items():
        if name == _OPERATIONS:
            value = [Operation(**{**op, "state": _STATES[op["state"]]}) for op in value]
        elif name == _PREPARED_ON:
            value = set(value)
        setattr(image, name, value)
    return image


def encode(image: Image, worker: str | None) -> bytes:
    """The image and the last host that worked on it, as one blob for the read model."""
    return _transcoder.encode({"schema": SCHEMA, "image": to_state(image), "worker": worker})


def decode(blob: bytes) -> tuple[Image, str | None]:
    document = _transcoder.decode(blob)
    if document.get("schema") != SCHEMA:
        raise ValueError("image state written by another version of the aggregate")
    return from_state(document["image"]), document["worker"]


def clone(image: Image) -> Image:
    """A copy that applying events to will not change ``image``.

    ``Image.apply`` replaces most attributes wholesale; the ones it mutates in place are the
    chain, the set of hosts, and each operation (its counters and history). Stage dicts and
    user data are only ever replaced, so they are shared.
    """
    twin = Image()
    twin.__dict__.update({k: v for k, v in vars(image).items() if not k.startswith("_")})
    if hasattr(image, "chain"):
        twin.chain = list(image.chain)
        twin.prepared_on = set(image.prepared_on)
        twin.operations = [_clone_operation(op) for op in image.operations]
    return twin


def _clone_operation(op: Operation) -> Operation:
    twin: Operation = object.__new__(Operation)  # copy.copy's protocol costs 10 us a call
    twin.__dict__.update(vars(op))
    twin.history = list(op.history)
    return twin


def by_id(image: Image) -> int:
    """Sort key: images in the order of their ids' strings, without making the strings (a
    UUID's string is its 128-bit number in fixed-width hex, so the orders agree)."""
    return image.id.int


def image_key(image_id: uuid.UUID | str) -> uuid.UUID:
    """An image id as the view keys it; raises ValueError for something that is not a UUID."""
    return image_id if isinstance(image_id, uuid.UUID) else uuid.UUID(str(image_id))
