"""The repository formats this Strata knows, by name: the one place a new driver is registered.

Kept apart from engine/formats/repository/driver.py so that the interface imports no driver and
every driver imports the interface. Imports: the drivers and :mod:`engine.errors`.
"""

from __future__ import annotations

from engine.errors import UnknownRepositoryFormat
from engine.formats.repository.driver import RepositoryFormat
from engine.formats.repository.localfs import LocalFS

FORMATS: dict[str, type[RepositoryFormat]] = {"localfs-1.0": LocalFS}


def get_format(name: object) -> type[RepositoryFormat]:
    """The driver registered as ``name`` (e.g. ``"localfs-1.0"``)."""
    try:
        return FORMATS[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise UnknownRepositoryFormat(name=name, known=", ".join(sorted(FORMATS))) from None
