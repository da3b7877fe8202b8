"""Checking what callers pass, before anything is appended or written (architecture §7).

Every function returns the value in the form the engine uses, or raises
:class:`~engine.errors.InvalidParameter` naming the parameter and saying what is expected.

Imports: ``engine.aggregates``, ``engine.errors``, ``engine.opaque``, msgpack; the standard
library.
"""

from __future__ import annotations

import re
import reprlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from engine.aggregates import operations as ops
from engine.errors import InvalidParameter
from engine.opaque import Opaque

SECTOR = 512
MAX_IMAGE_SIZE = 2**46  # 64 TiB: beyond it a request is a mistake, not a disk
MAX_USER_DATA = 64 * 1024
MAX_USER_DATA_DEPTH = 32  # levels of lists and dicts: deeper is a mistake, or a cycle
_SCALARS = frozenset((type(None), bool, int, float, str, bytes))
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # msgpack's ints
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


_VOLUME_ID = re.compile(r"[0-9a-f]{32}")
MAX_BANDWIDTH = 2**63 - 1


def volume_id(value: object, name: str = "base_volume_id") -> str:
    """A volume id as get_volume_chain gives it: 32 lowercase hex digits."""
    if isinstance(value, str) and _VOLUME_ID.fullmatch(value):
        return value
    raise InvalidParameter(f"a volume id from get_volume_chain, not {value!r}", name=name)


def bandwidth(value: object, name: str = "bandwidth") -> int:
    """Bytes per second a block job may use; None or 0 for no limit."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BANDWIDTH:
        raise InvalidParameter(
            f"bytes per second (an int, 0 for no limit), not {value!r}", name=name
        )
    return value


def size(value: object, name: str = "size") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(f"a number of bytes (int), not {type(value).__name__}", name=name)
    if value <= 0 or value > MAX_IMAGE_SIZE:
        raise InvalidParameter(f"between 1 and {MAX_IMAGE_SIZE} bytes, not {value}", name=name)
    if value % SECTOR:
        raise InvalidParameter(f"a multiple of {SECTOR} bytes, not {value}", name=name)
    return value


def user_data(value: object) -> Opaque | None:
    """The value packed, for the engine to carry and hand back unread (architecture §6).

    Only values that come back exactly as given are taken: None, bool, int (-2**63 to
    2**64-1), float (NaN and infinities too), str, bytes, lists, and dicts keyed by any of
    those scalars, nested at most :data:`MAX_USER_DATA_DEPTH` deep. A dict subclass
    (``OrderedDict``) is taken as the dict it is; anything that would come back as another
    type (a tuple as a list, an ``IntEnum`` as an int, a ``str`` subclass as a str) is refused.
    """
    if value is None:
        return None
    plain = _plain(value, 0)
    try:
        packed = msgpack.packb(plain, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError) as e:  # _plain should have refused it
        raise InvalidParameter(f"data msgpack can encode ({e})", name="user_data") from e
    if len(packed) > MAX_USER_DATA:
        raise InvalidParameter(
            f"at most {MAX_USER_DATA} bytes encoded, not {len(packed)}: keep large data "
            "elsewhere and put its name here",
            name="user_data",
        )
    return Opaque(packed)


def _plain(value: Any, depth: int) -> Any:
    """``value`` with dict subclasses made dicts; raises for what would not round-trip."""
    kind = type(value)
    if kind in _SCALARS:
        if kind is int and not _INT_MIN <= value <= _INT_MAX:
            raise InvalidParameter(
                f"integers from -2**63 to 2**64-1 (msgpack's), not {value}: store larger "
                "numbers as strings",
                name="user_data",
            )
        return value
    if depth >= MAX_USER_DATA_DEPTH:
        raise InvalidParameter(
            f"lists and dicts nested at most {MAX_USER_DATA_DEPTH} deep (is the value recursive?)",
            name="user_data",
        )
    if kind is list:
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():
            if type(key) not in _SCALARS:
                raise InvalidParameter(
                    f"dict keys that are None, bool, int, float, str or bytes, not "
                    f"{type(key).__name__} {reprlib.repr(key)}",
                    name="user_data",
                )
            plain[_plain(key, depth + 1)] = _plain(item, depth + 1)
        return plain
    raise InvalidParameter(_refusal(value), name="user_data")


def _refusal(value: object) -> str:
    kind = type(value)
    if isinstance(value, tuple):
        return "lists, not tuples (they would come back as lists)"
    if isinstance(value, bytearray | memoryview):
        return f"bytes, not {kind.__name__} (convert it with bytes(...))"
    for base in (bool, int, float, str, bytes, list):
        if isinstance(value, base):
            # An IntEnum or a str subclass would come back as its plain base type.
            name = base.__name__
            return (
                f"plain {name} values, not {kind.__name__} {reprlib.repr(value)} (it would come "
                f"back as a plain {name}: convert it with {name}(...))"
            )
    return (
        f"None, bool, int, float, str, bytes, lists and dicts, not {kind.__name__} "
        "(msgpack cannot hold it as it is)"
    )


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


def fix_options(value: object, *, also: frozenset[str] = frozenset()) -> tuple[str, ...] | None:
    """The options of ``fix_storage_repository`` (and ``check_storage_repository``, which
    also takes the keys ``also``, checked by its caller): ``participating_repositories``, the
    only repositories a mend looks for a replica in (docs/adr/0034). Returns those names, or
    None to look in every connected repository."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"a dict, not {type(value).__name__}", name="options")
    known = {"participating_repositories", *also}
    unknown = set(value) - known
    if unknown:
        raise InvalidParameter(
            f"unknown keys {sorted(map(str, unknown))}; known: {sorted(known)}", name="options"
        )
    participating = value.get("participating_repositories")
    if participating is None:
        return None
    if not isinstance(participating, list | tuple) or not participating:
        raise InvalidParameter(
            "participating_repositories must be a non-empty list of repo ids", name="options"
        )
    return tuple(repo_id(r, "participating_repositories") for r in participating)


def check_options(value: object) -> bool:
    """``check_storage_repository``'s options: ``{"deep": bool}`` (docs/adr/0033), or None.
    Returns whether the check is deep."""
    if value is None:
        return False
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"a dict, not {type(value).__name__}", name="options")
    # participating_repositories: where a mend looks for replicas (fix_options checks it).
    unknown = set(value) - {"deep", "participating_repositories"}
    if unknown:
        raise InvalidParameter(
            f"unknown keys {sorted(map(str, unknown))}; known: "
            "['deep', 'participating_repositories']",
            name="options",
        )
    deep = value.get("deep", False)
    if not isinstance(deep, bool):
        raise InvalidParameter(f"deep must be True or False, not {deep!r}", name="options")
    return deep


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
