"""Shared fixtures of the multi-host tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hosts.hostlib import formatted_repositories


@pytest.fixture
def repos(tmp_path: Path) -> dict[str, str]:
    """Two formatted localfs repositories, by name."""
    return formatted_repositories(tmp_path)
