"""The promise of architecture §5, tried point by point: a host killed with SIGKILL anywhere in
any operation leaves nothing that another host cannot finish.

For each (operation, crash point) pair, host A (a process of its own) runs the operation with
that crash point armed and dies there; its whole process group is then killed too, as a fenced
machine's would be. Host B starts on the same repositories, takes A's claims over once A's
heartbeat has been silent for ``lease_timeout`` (1 s), and must bring the image to the state the
operation asked for, with data that ``qemu-img compare`` finds identical to what was expected;
``strata-log verify`` must pass, every record committed before the kill must still be there,
byte for byte, and after ``check`` + ``fix`` no leftover file may remain. The pairs of one
operation run side by side, each on its own copy of the world (sweep_world.py).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.executors import crashpoints as cp
from tests.hosts.sweep_world import OPERATIONS, World, build_world, kill_host_a, recover_with_host_b

# Every point the stage kinds pass, around every append the executor makes.
_PRODUCING = [
    cp.BEFORE_CLAIM,
    cp.AFTER_CLAIM,
    cp.BEFORE_DATA,
    cp.BEFORE_PUBLISH,
    cp.AFTER_PUBLISH,
    cp.AFTER_DATA,
    cp.AFTER_COMPLETION,
]
_PROGRESS = [cp.BEFORE_PROGRESS, cp.AFTER_PROGRESS]
_IN_PLACE = [cp.BEFORE_CLAIM, cp.AFTER_CLAIM, cp.BEFORE_DATA, cp.AFTER_DATA, cp.AFTER_COMPLETION]
_SECOND = [
    f"{p}@2" for p in (cp.AFTER_CLAIM, cp.BEFORE_DATA, cp.BEFORE_PUBLISH, cp.AFTER_COMPLETION)
]

POINTS: dict[str, list[str]] = {
    "create": _PRODUCING,
    "create-performance": _PRODUCING,  # a preallocated raw volume
    "disk-from-snapshot": _PRODUCING,  # an overlay
    "snapshot": _PRODUCING,  # the disk's new overlay
    "copy": [*_PRODUCING, cp.MID_COPY, *_PROGRESS],
    "copy-performance": [*_PRODUCING, cp.MID_COPY, *_PROGRESS],
    "incremental-copy": [*_PRODUCING, cp.MID_REBASE, *_PROGRESS],  # a diff stage
    # Two operations: the overlay first, then a flattening copy ("@2": the second stage).
    "optimize": [*_PRODUCING, cp.MID_COPY, *_PROGRESS, *_SECOND],
    "resize": _IN_PLACE,
    "merge": [*_IN_PLACE, cp.MID_REBASE, *_PROGRESS],  # a rebase stage
    "clean": [*_IN_PLACE, cp.MID_DELETE],  # a delete stage
}
PAIRS = [(op, point) for op, points in POINTS.items() for point in points]
SIDE_BY_SIDE = 4


def test_the_sweep_covers_every_operation_and_at_least_fifty_pairs() -> None:
    assert set(POINTS) == set(OPERATIONS)
    assert len(set(PAIRS)) == len(PAIRS) >= 50
    kinds_hit = {p.split("@")[0] for points in POINTS.values() for p in points}
    assert kinds_hit == set(cp.ALL_NAMES)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield build_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("operation", list(POINTS))
def test_an_operation_killed_at_any_point_is_finished_by_another_host(
    world: World, operation: str, tmp_path: Path
) -> None:
    def run(point: str) -> str | None:
        workdir = tmp_path / point.replace("@", "-at-")
        try:
            paths = kill_host_a(world, OPERATIONS[operation], point, workdir)
            recover_with_host_b(world, OPERATIONS[operation], paths, workdir)
        except Exception:  # reported with its point below, every failing point at once
            return f"--- {operation} killed at {point}:\n{traceback.format_exc()}"
        return None

    with ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        failures = [f for f in pool.map(run, POINTS[operation]) if f is not None]
    assert not failures, "\n".join(failures)
