"""Strata: an event-sourced storage engine for virtual-machine disk images.

``from engine import StorageEngine`` is the facade (architecture §1). Names are resolved on
first use so that tools that only read a log (``strata-log``) do not import the whole engine.

Imports: ``engine.facade``, ``engine.types``; the standard library.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# A library logs to its loggers and leaves where the lines go to the application: without this,
# Python would print warnings to stderr when the application configured no logging at all.
logging.getLogger("engine").addHandler(logging.NullHandler())

__all__ = [
    "Attachment",
    "BlockJob",
    "Fix",
    "ImageInfo",
    "ImageStatus",
    "PreparedImage",
    "StorageEngine",
    "Volume",
]

if TYPE_CHECKING:
    from engine.facade import StorageEngine
    from engine.types import (
        Attachment,
        BlockJob,
        Fix,
        ImageInfo,
        ImageStatus,
        PreparedImage,
        Volume,
    )


def __getattr__(name: str) -> Any:
    if name == "StorageEngine":
        from engine.facade import StorageEngine

        return StorageEngine
    if name in __all__ and name != "StorageEngine":
        from engine import types

        return getattr(types, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
