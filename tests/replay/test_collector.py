"""Replay pauses the garbage collector and leaves the process's collector as it found it."""

from __future__ import annotations

import gc

import pytest

from engine.projections.point_in_time import long_lived


def test_long_lived_restores_the_collector() -> None:
    thresholds = gc.get_threshold()
    assert gc.isenabled()
    with long_lived():
        assert not gc.isenabled()
        kept = [[n] for n in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
    assert kept[-1] == [999]


def test_long_lived_leaves_the_callers_frozen_objects_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with long_lived():
            kept = [[n] for n in range(1000)]
        assert gc.get_freeze_count() == frozen
        assert gc.isenabled()
        assert len(kept) == 1000
    finally:
        gc.unfreeze()


def test_long_lived_keeps_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with long_lived():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_long_lived_reenables_on_error() -> None:
    with pytest.raises(RuntimeError), long_lived():
        raise RuntimeError("boom")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
