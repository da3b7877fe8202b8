"""The repository command that writes to a log: formatting a new repository.

Connecting and disconnecting write no event (only this host's heartbeat, engine/bootstrap.py);
creating one formats the place with its driver and records, as the new log's first event, which
format it has and which host made it, when.

Imports: the repository format's interface (:mod:`engine.formats.repository.driver`) and
:mod:`engine.application` (the event store over the new log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from engine.application import LogConfig, StrataLogApplication
from engine.formats.repository.driver import RepositoryFormat


def create_repository(
    driver: type[RepositoryFormat],
    connection_parameters: Mapping[str, object],
    host_id: str,
    now: Callable[[], datetime],
) -> None:
    """Format an empty place as a repository (refuses a non-empty or formatted one)."""
    driver.create(connection_parameters, host_id)
    storage = driver.open(connection_parameters)
    with StrataLogApplication(LogConfig(log_dir=storage.log_dir, host_id=host_id)) as app:
        app.create_repository(
            format_name=driver.name, format_version=driver.version, created_at=now()
        )
