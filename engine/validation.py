"""Checking what callers pass, before anything is appended or written (SPEC §10).

Every function returns the value in the form the engine uses, or raises
:class:`~engine.errors.InvalidParameter` naming the parameter and saying what is expected.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from engine.aggregates import operations as ops
from engine.errors import InvalidParameter

SECTOR = 512
MAX_IMAGE_SIZE = 2**46  # 64 TiB: beyond it a request is a mistake, not a disk
MAX_USER_DATA = 64 * 1024
# fullmatch, never match with "$": "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_OPTION_KEYS = {"auto_fix", "strategy", "participating_repositories", "image_hints"}


def host_id(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidParameter(
            "1-64 characters from letters, digits, '.', '_' and '-', starting with a letter "
            f"or digit, not {value!r}",
            name="host_id",
        )
    return value


def repo_id(value: object, name: str = "repo_id") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidParameter(
            f"a name of 1-64 letters, digits, '.', '_' or '-' (no path separators), not {value!r}",
            name=name,
        )
    return value


def image_id(value: object, name: str = "image_id") -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) <= 36:
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidParameter(
        f"an image id as returned by the engine (a UUID), not {value!r}", name=name
    )


def size(value: object, name: str = "size") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(f"a number of bytes (int), not {type(value).__name__}", name=name)
    if value <= 0 or value > MAX_IMAGE_SIZE:
        raise InvalidParameter(f"between 1 and {MAX_IMAGE_SIZE} bytes, not {value}", name=name)
    if value % SECTOR:
        raise InvalidParameter(f"a multiple of {SECTOR} bytes, not {value}", name=name)
    return value


def user_data(value: object) -> Any:
    """Anything msgpack encodes (dicts with string keys, lists, numbers, strings, bytes)."""
    try:
        packed = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidParameter(f"data msgpack can encode ({e})", name="user_data") from e
    if len(packed) > MAX_USER_DATA:
        raise InvalidParameter(
            f"at most {MAX_USER_DATA} bytes encoded, not {len(packed)}", name="user_data"
        )
    _no_tuples(value)
    return value


def _no_tuples(value: object) -> None:
    # A tuple would come back as a list after a replay: refuse it rather than change it.
    if isinstance(value, tuple):
        raise InvalidParameter(
            "lists, not tuples (they would come back as lists)", name="user_data"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidParameter(f"string keys only, not {k!r}", name="user_data")
            _no_tuples(v)
    elif isinstance(value, list):
        for v in value:
            _no_tuples(v)


@dataclass(frozen=True)
class Options:
    auto_fix: bool = True
    strategy: str = ops.SPACE
    participating_repositories: tuple[str, ...] | None = None
    image_hints: dict[uuid.UUID, str] = field(default_factory=dict)


def options(value: object) -> Options:
    if value is None:
        return Options()
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"a dict, not {type(value).__name__}", name="options")
    unknown = set(value) - _OPTION_KEYS
    if unknown:
        raise InvalidParameter(
            f"unknown keys {sorted(map(str, unknown))}; known: {sorted(_OPTION_KEYS)}",
            name="options",
        )
    auto_fix = value.get("auto_fix", True)
    if not isinstance(auto_fix, bool):
        raise InvalidParameter("auto_fix must be True or False", name="options")
    strategy = value.get("strategy", ops.SPACE)
    if strategy not in ops.STRATEGIES:
        raise InvalidParameter(
            f"strategy must be one of {list(ops.STRATEGIES)}, not {strategy!r}", name="options"
        )
    participating = value.get("participating_repositories")
    if participating is not None:
        if not isinstance(participating, list | tuple) or not participating:
            raise InvalidParameter(
                "participating_repositories must be a non-empty list of repo ids", name="options"
            )
        participating = tuple(repo_id(r, "participating_repositories") for r in participating)
    hints = value.get("image_hints") or {}
    if not isinstance(hints, Mapping):
        raise InvalidParameter("image_hints must be a dict {image_id: repo_id}", name="options")
    parsed = {image_id(k, "image_hints"): repo_id(v, "image_hints") for k, v in hints.items()}
    return Options(auto_fix, strategy, participating, parsed)


def connection_parameters(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidParameter("a dict with string keys", name="connection_parameters")
    return dict(value)


def positive_seconds(value: object, name: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not value > 0
        or value != value  # NaN
        or value == float("inf")
    ):
        raise InvalidParameter(f"a positive number of seconds, not {value!r}", name=name)
    return float(value)
