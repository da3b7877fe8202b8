"""The wiring and the command handlers without the facade: a config checked once, one
repository's parts built on connect, handlers that return what they made (docs/adr/0020)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.aggregates import operations as ops
from engine.bootstrap import EngineConfig, Wiring
from engine.connections import ConnectedRepository
from engine.errors import InvalidParameter, RepositoryAlreadyConnected, WrongImageKind
from engine.formats.repository.registry import get_format
from engine.service import repository_handlers
from engine.service.unit_of_work import utc_now
from engine.validation import Options

MiB = 2**20


@pytest.fixture
def wiring(tmp_path: Path) -> Iterator[Wiring]:
    config = EngineConfig.checked("host-a", state_dir=str(tmp_path / "state"), run_executors=False)
    wiring = Wiring(config)
    yield wiring
    wiring.repositories.close()


@pytest.fixture
def repo(wiring: Wiring, repo_paths: tuple[str, str]) -> ConnectedRepository:
    driver = get_format("localfs-1.0")
    params = {"path": repo_paths[0]}
    repository_handlers.create_repository(driver, params, "host-a", utc_now)
    return wiring.connect("r1", "localfs-1.0", driver, params)


def test_a_config_is_checked_and_its_state_directory_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = EngineConfig.checked("host-a", state_dir="state", lease_timeout=5)
    assert config.state_dir == str(tmp_path / "state")
    assert (config.lease_timeout, config.run_executors, config.workers) == (5.0, True, 2)
    with pytest.raises(InvalidParameter):
        EngineConfig.checked("host-a", workers=0)
    with pytest.raises(InvalidParameter):
        EngineConfig.checked("../host")


def test_connecting_wires_the_repository_and_registers_it_once(
    wiring: Wiring, repo: ConnectedRepository, repo_paths: tuple[str, str]
) -> None:
    assert wiring.repositories["r1"] is repo
    assert repo.executor is None  # the config said this host runs no executors
    assert repo.lease is not None and repo.view.repository is not None
    driver = get_format("localfs-1.0")
    with pytest.raises(RepositoryAlreadyConnected):
        wiring.connect("r2", "localfs-1.0", driver, {"path": repo_paths[0]})


def test_image_handlers_return_the_images_they_made(repo: ConnectedRepository) -> None:
    disk = repo.images.create_virtual_disk(MiB, None, Options())
    snapshot = repo.images.create_snapshot(repo.service.get(disk), None, Options())
    copy = repo.images.copy_image(repo.service.get(snapshot), None, Options())
    assert repo.service.get(disk).kind == ops.VIRTUAL_DISK
    assert repo.service.get(snapshot).kind == ops.SNAPSHOT
    assert repo.service.get(snapshot).origin == {"how": "snapshot", "of": str(disk)}
    assert repo.service.get(copy).origin == {"how": "copy", "of": str(snapshot)}
    with pytest.raises(WrongImageKind):
        repo.images.create_snapshot(repo.service.get(snapshot), None, Options())
