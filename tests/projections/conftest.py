"""Fixtures of the projection tests: a repository's log (see projection_log.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.projections.projection_log import Repo


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    r = Repo(tmp_path / "log")
    yield r
    r.app.close()
