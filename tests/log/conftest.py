"""Fixtures for the operation log's tests: real directories, real files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def log_dir(tmp_path: Path) -> str:
    """Where a test's log goes; the directory does not exist yet."""
    return str(tmp_path / "log")
