"""What each call plans: the volumes of the new chain, and the operations and stages that make
them, by strategy (engine/planning.py, ADR 0004). Pure: no log, no files, no engine.

The plans are checked in their stored form (plain keys and strings, in the order the log holds
them), which is what an executor reads back and what a fix's id is hashed from.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import planning
from engine.aggregates import operations as ops

SIZE = 8 * 2**20
SOURCE = uuid.UUID(int=1)  # the image copied from
IMAGE = uuid.UUID(int=2)  # the image being planned
SNAPSHOT_CHAIN = [ops.volume_ref(f"{n:032x}", "qcow2") for n in (0xA1, 0xA2)]
OP_ID = re.compile(r"[0-9a-f]{32}")


class Volumes:
    """A stand-in for ``planning.fresh_volume``: volumes numbered in the order they are asked
    for, so a test can name them before the plan is made."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def __call__(self, fmt: str) -> str:
        self.made.append(ops.volume_ref(f"{len(self.made) + 1:032x}", fmt))
        return self.made[-1]


def vol(n: int, fmt: str) -> str:
    """The ``n``-th volume a fresh :class:`Volumes` hands out."""
    return ops.volume_ref(f"{n:032x}", fmt)


def stored(plans: list[Any]) -> list[dict[str, Any]]:
    """The plans as the log holds them, their op ids left out (those are random)."""
    kept = json.loads(json.dumps(plans))
    for plan in kept:
        assert OP_ID.fullmatch(plan.pop("op_id")), plan
    return list(kept)


def key_order(plans: list[Any]) -> list[list[list[str]]]:
    """Each plan's keys, then each of its stages' keys, in order: the bytes of a stored stage."""
    return [[list(plan), *(list(stage) for stage in plan["stages"])] for plan in plans]


# --- a blank disk -----------------------------------------------------------------------------


def test_a_blank_disk_for_space_is_one_thin_qcow2_volume() -> None:
    chain, work = planning.blank_disk(SIZE, ops.SPACE, Volumes())

    assert chain == [vol(1, "qcow2")]
    assert stored(work) == [
        {
            "purpose": "create",
            "stages": [{"do": "create", "volume": vol(1, "qcow2"), "size": SIZE}],
        }
    ]


def test_a_blank_disk_for_performance_is_one_preallocated_raw_volume() -> None:
    chain, work = planning.blank_disk(SIZE, ops.PERFORMANCE, Volumes())

    assert chain == [vol(1, "raw")]
    assert stored(work) == [
        {
            "purpose": "create",
            "stages": [
                {"do": "create", "volume": vol(1, "raw"), "size": SIZE, "preallocate": True}
            ],
        }
    ]


# --- a disk on a snapshot ---------------------------------------------------------------------


def test_a_disk_on_a_snapshot_for_space_is_an_overlay_on_the_snapshots_top() -> None:
    chain, work = planning.disk_on_snapshot(SIZE, SNAPSHOT_CHAIN, ops.SPACE, IMAGE, Volumes())

    assert chain == [*SNAPSHOT_CHAIN, vol(1, "qcow2")]
    assert stored(work) == [
        {
            "purpose": "create",
            "stages": [
                {
                    "do": "create",
                    "volume": vol(1, "qcow2"),
                    "size": SIZE,
                    "backing": SNAPSHOT_CHAIN[-1],
                }
            ],
        }
    ]


def test_a_disk_on_a_snapshot_for_performance_is_the_overlay_first_then_its_own_raw_copy() -> None:
    chain, work = planning.disk_on_snapshot(SIZE, SNAPSHOT_CHAIN, ops.PERFORMANCE, IMAGE, Volumes())

    assert chain == [*SNAPSHOT_CHAIN, vol(1, "qcow2")]  # usable at once, degraded
    assert stored(work) == [
        {
            "purpose": "create",
            "stages": [
                {
                    "do": "create",
                    "volume": vol(1, "qcow2"),
                    "size": SIZE,
                    "backing": SNAPSHOT_CHAIN[-1],
                }
            ],
        },
        {
            "purpose": "optimize",
            "stages": [
                {
                    "do": "copy",
                    "source_image": str(IMAGE),
                    "volume": vol(2, "raw"),
                    "preallocate": True,
                    "set_chain": [vol(2, "raw")],
                }
            ],
        },
    ]


# --- a snapshot -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [ops.SPACE, ops.PERFORMANCE])
def test_a_snapshot_gives_the_disk_a_new_top_overlay_on_its_frozen_chain(strategy: str) -> None:
    disk_chain = [vol(0xB1, "qcow2")]
    top, work = planning.snapshot_of_disk(IMAGE, disk_chain, SIZE, strategy, Volumes())

    assert top == vol(1, "qcow2")
    assert stored(work)[0] == {
        "purpose": "snapshot",
        "stages": [
            {"do": "create", "volume": top, "size": SIZE, "backing": disk_chain[-1]},
        ],
    }
    assert disk_chain == [vol(0xB1, "qcow2")]  # the caller's chain is left as it was


def test_a_snapshot_for_performance_then_flattens_the_disk_not_the_snapshot() -> None:
    _, work = planning.snapshot_of_disk(IMAGE, [vol(0xB1, "raw")], SIZE, ops.PERFORMANCE, Volumes())

    assert [plan["purpose"] for plan in stored(work)] == ["snapshot", "optimize"]
    assert stored(work)[1]["stages"] == [
        {
            "do": "copy",
            "source_image": str(IMAGE),
            "volume": vol(2, "raw"),
            "preallocate": True,
            "set_chain": [vol(2, "raw")],
        }
    ]


def test_a_snapshot_for_space_needs_no_more_work() -> None:
    _, work = planning.snapshot_of_disk(IMAGE, [vol(0xB1, "qcow2")], SIZE, ops.SPACE, Volumes())

    assert [plan["purpose"] for plan in stored(work)] == ["snapshot"]


def test_a_snapshot_s_own_work_is_the_digest_of_its_top_once_the_disk_writes_elsewhere() -> None:
    new_top = vol(0xC1, "qcow2")

    assert stored([planning.snapshot_digest(SNAPSHOT_CHAIN, new_top)]) == [
        {
            "purpose": "snapshot",
            "stages": [
                {
                    "do": "digest",
                    "volume": SNAPSHOT_CHAIN[-1],
                    "backing": SNAPSHOT_CHAIN[0],  # its recorded digest stands for the rest
                    "frozen_by": new_top,
                }
            ],
        }
    ]
    (alone,) = stored([planning.snapshot_digest(SNAPSHOT_CHAIN[:1], new_top)])
    assert alone["stages"] == [{"do": "digest", "volume": SNAPSHOT_CHAIN[0], "frozen_by": new_top}]


# --- copies -----------------------------------------------------------------------------------


def test_a_full_copy_for_space_is_a_sparse_qcow2_copy_of_the_whole_chain() -> None:
    chain, work = planning.full_copy(SOURCE, ops.SPACE, Volumes())

    assert chain == [vol(1, "qcow2")]
    assert stored(work) == [
        {
            "purpose": "copy",
            "stages": [{"do": "copy", "source_image": str(SOURCE), "volume": vol(1, "qcow2")}],
        }
    ]


def test_a_full_copy_for_performance_is_a_preallocated_raw_copy() -> None:
    chain, work = planning.full_copy(SOURCE, ops.PERFORMANCE, Volumes())

    assert chain == [vol(1, "raw")]
    assert stored(work) == [
        {
            "purpose": "copy",
            "stages": [
                {
                    "do": "copy",
                    "source_image": str(SOURCE),
                    "volume": vol(1, "raw"),
                    "preallocate": True,
                }
            ],
        }
    ]


def test_an_incremental_copy_for_space_is_the_difference_on_top_of_the_base() -> None:
    chain, work = planning.incremental_copy(SOURCE, SNAPSHOT_CHAIN, ops.SPACE, IMAGE, Volumes())

    assert chain == [*SNAPSHOT_CHAIN, vol(1, "qcow2")]
    assert stored(work) == [
        {
            "purpose": "copy",
            "stages": [
                {
                    "do": "diff",
                    "source_image": str(SOURCE),
                    "base": SNAPSHOT_CHAIN[-1],
                    "volume": vol(1, "qcow2"),
                }
            ],
        }
    ]


def test_an_incremental_copy_for_performance_transfers_the_difference_then_flattens_the_copy() -> (
    None
):
    chain, work = planning.incremental_copy(
        SOURCE, SNAPSHOT_CHAIN, ops.PERFORMANCE, IMAGE, Volumes()
    )

    assert chain == [*SNAPSHOT_CHAIN, vol(1, "qcow2")]
    plans = stored(work)
    assert [plan["purpose"] for plan in plans] == ["copy", "optimize"]
    assert plans[0]["stages"][0]["do"] == "diff"
    assert plans[1]["stages"] == [  # the new image's chain, not the source's
        {
            "do": "copy",
            "source_image": str(IMAGE),
            "volume": vol(2, "raw"),
            "preallocate": True,
            "set_chain": [vol(2, "raw")],
        }
    ]


# --- resize and optimize ----------------------------------------------------------------------


def test_a_resize_grows_the_top_volume() -> None:
    top = vol(0xC1, "qcow2")

    assert stored([planning.resize(top, 2 * SIZE)]) == [
        {"purpose": "resize", "stages": [{"do": "resize", "volume": top, "size": 2 * SIZE}]}
    ]


def test_an_optimize_fix_keeps_the_operation_id_it_is_given() -> None:
    """A fix offers an optimize under a known id: the plan must carry that one."""
    plan = planning.optimize_plan(IMAGE, Volumes(), op="f" * 32)

    assert plan["op_id"] == "f" * 32
    assert stored([plan]) == [
        {
            "purpose": "optimize",
            "stages": [
                {
                    "do": "copy",
                    "source_image": str(IMAGE),
                    "volume": vol(1, "raw"),
                    "preallocate": True,
                    "set_chain": [vol(1, "raw")],
                }
            ],
        }
    ]


# --- what holds for every call ----------------------------------------------------------------

# Each call with its arguments, as the service makes it: (chain or top, work).
CALLS: dict[str, Callable[[str, Volumes], tuple[Any, list[Any]]]] = {
    "blank disk": lambda s, new: planning.blank_disk(SIZE, s, new),
    "disk on snapshot": lambda s, new: planning.disk_on_snapshot(
        SIZE, SNAPSHOT_CHAIN, s, IMAGE, new
    ),
    "snapshot": lambda s, new: planning.snapshot_of_disk(IMAGE, SNAPSHOT_CHAIN, SIZE, s, new),
    "full copy": lambda s, new: planning.full_copy(SOURCE, s, new),
    "incremental copy": lambda s, new: planning.incremental_copy(
        SOURCE, SNAPSHOT_CHAIN, s, IMAGE, new
    ),
    "resize": lambda s, new: (None, [planning.resize(SNAPSHOT_CHAIN[-1], SIZE)]),
}
STRATEGIES = [ops.SPACE, ops.PERFORMANCE]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_operation_has_an_id_of_its_own(call: str, strategy: str) -> None:
    _, work = CALLS[call](strategy, Volumes())
    again = [plan["op_id"] for plan in CALLS[call](strategy, Volumes())[1]]

    ids = [plan["op_id"] for plan in work]
    assert all(OP_ID.fullmatch(i) for i in ids)
    assert len(set(ids + again)) == len(ids) * 2


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_call_planned_twice_plans_the_same_work(call: str, strategy: str) -> None:
    """Pure: the same arguments and volumes plan the same stages (only op ids differ)."""
    chain_before = list(SNAPSHOT_CHAIN)
    first, again = CALLS[call](strategy, Volumes()), CALLS[call](strategy, Volumes())

    assert first[0] == again[0]
    assert stored(first[1]) == stored(again[1])
    assert chain_before == SNAPSHOT_CHAIN  # the caller's chain is left as it was


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_each_volume_asked_for_is_made_by_exactly_one_stage(call: str, strategy: str) -> None:
    new = Volumes()
    _, work = CALLS[call](strategy, new)

    made = [ops.produced_by(stage) for plan in work for stage in plan["stages"]]
    assert sorted(v for v in made if v is not None) == sorted(new.made)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_stored_plan_keeps_its_keys_in_the_order_the_log_has_always_held(
    call: str, strategy: str
) -> None:
    """A stage's bytes follow its keys' order, and a fix's id is hashed from those bytes."""
    _, work = CALLS[call](strategy, Volumes())
    orders = {
        "create": ["do", "volume", "size"],
        "create on a backing": ["do", "volume", "size", "backing"],
        "create preallocated": ["do", "volume", "size", "preallocate"],
        "copy": ["do", "source_image", "volume"],
        "copy preallocated": ["do", "source_image", "volume", "preallocate"],
        "optimize": ["do", "source_image", "volume", "preallocate", "set_chain"],
        "diff": ["do", "source_image", "base", "volume"],
        "resize": ["do", "volume", "size"],
    }

    for plan_keys, *stage_keys in key_order(work):
        assert plan_keys == ["op_id", "purpose", "stages"]
        for keys in stage_keys:
            assert keys in orders.values(), keys


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_new_disk_is_usable_before_any_optimize_runs(strategy: str) -> None:
    """Performance reaches its raw volume through the quick form first: the chain returned is
    the one the first operation makes, and only a later optimize replaces it."""
    for call in ("blank disk", "disk on snapshot", "full copy", "incremental copy"):
        new = Volumes()
        chain, work = CALLS[call](strategy, new)
        first_made = [ops.produced_by(stage) for stage in work[0]["stages"]]
        assert chain[-1] in first_made, call
        assert all("set_chain" not in stage for stage in work[0]["stages"]), call
        for later in work[1:]:
            assert later["purpose"] == "optimize", call


@given(size=st.integers(1, 2**50), strategy=st.sampled_from(STRATEGIES))
def test_the_size_asked_for_is_the_size_every_created_volume_gets(size: int, strategy: str) -> None:
    _, blank = planning.blank_disk(size, strategy, Volumes())
    _, on_snapshot = planning.disk_on_snapshot(size, SNAPSHOT_CHAIN, strategy, IMAGE, Volumes())
    _, snapshot = planning.snapshot_of_disk(IMAGE, SNAPSHOT_CHAIN, size, strategy, Volumes())

    stages: list[Mapping[str, Any]] = [
        stage for plan in blank + on_snapshot + snapshot for stage in plan["stages"]
    ]
    assert {stage["size"] for stage in stages if stage["do"] == "create"} == {size}


def test_a_fresh_volume_is_a_new_volume_reference_of_its_format() -> None:
    refs = [planning.fresh_volume(fmt) for fmt in ("raw", "qcow2", "qcow2")]

    assert [ops.split_ref(ref)[1] for ref in refs] == ["raw", "qcow2", "qcow2"]
    assert len({ops.split_ref(ref)[0] for ref in refs}) == 3
