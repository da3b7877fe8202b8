"""Fixtures that make real storage faults (tests/faults/smallfs.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.smallfs import SmallFs, skip_reason


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., SmallFs]]:
    """Make small loop-mounted filesystems (``small_fs(size_mib=64)``); all unmounted after."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[SmallFs] = []

    def make(size_mib: int = 64) -> SmallFs:
        workdir = tmp_path / f"smallfs{len(made)}"
        workdir.mkdir()
        fs = SmallFs(str(workdir), size_mib)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.destroy()
