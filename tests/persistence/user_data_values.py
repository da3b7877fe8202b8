"""User data as hypothesis draws it: every value msgpack represents that Strata takes, with the
transcoder's own wrapper keys (``_type_``/``_data_``) at any depth, and a strict comparison."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import strategies as st

# The transcoder's wrapper names, real and made up: none of them may be taken for one.
_WRAPPER_NAMES = st.sampled_from(
    ["uuid_hex", "decimal_str", "datetime_iso", "tuple_as_list", "no_such", ""]
)
_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_EDGE_INTS = st.sampled_from([-(2**63), -(2**31) - 1, -1, 0, 127, 2**32, 2**63, 2**64 - 1])
SCALARS = (
    st.none()
    | st.booleans()
    | _INTS
    | _EDGE_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
KEYS = st.sampled_from(["_type_", "_data_", "name"]) | SCALARS


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    wrapper = st.fixed_dictionaries(
        {"_type_": _WRAPPER_NAMES | st.text(max_size=8) | _INTS, "_data_": children}
    )
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(KEYS, children, max_size=4)
        | wrapper
        | wrapper.map(lambda d: {"_data_": d["_data_"], "_type_": d["_type_"]})  # other order
    )


USER_DATA = st.recursive(SCALARS, _containers, max_leaves=24)


def exact(value: Any) -> bytes:
    """What ``value`` is, to the type and the bit: its msgpack bytes with exact types (so NaN
    equals NaN, -0.0 differs from 0.0, True from 1, and a UUID or tuple cannot pass)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True)
    return packed
