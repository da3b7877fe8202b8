"""The values the facade returns (architecture §1): frozen, with ``to_dict()`` for JSON and logs.

Imports: the standard library only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OPTIMIZED, DEGRADED, BROKEN = "optimized", "degraded", "broken"


class _AsDict:
    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool | dict) or value is None:
        return value
    return str(value)


@dataclass(frozen=True)
class ImageStatus(_AsDict):
    """What get_image_status returns (architecture §1): the status and the last progress saved."""

    image_id: str
    status: str  # optimized | degraded | broken
    host_id: str | None  # the last host that worked on the image
    stage: str  # "X/Y" of the operation in progress (or the last one)
    percent_complete: int  # -1, or 0..100 for the stage
    last_error: str | None


@dataclass(frozen=True)
class Fix(_AsDict):
    """A unit of repair or improvement work, to be passed back exactly as returned."""

    type: str  # clean | optimize | merge | mend
    image_ids: tuple[str, ...]
    description: str
    data: str  # opaque


@dataclass(frozen=True)
class PreparedImage(_AsDict):
    """What a virtual machine opens."""

    image_id: str
    path: str
    format: str  # raw | qcow2
    readonly: bool


@dataclass(frozen=True)
class Attachment(_AsDict):
    """An image this host's storage daemon serves over NBD (docs/adr/0027)."""

    image_id: str
    repo_id: str
    nbd_uri: str  # what ``qemu-io -f raw URI`` or a virtual machine opens
    readonly: bool  # True for snapshots


@dataclass(frozen=True)
class Volume(_AsDict):
    """One volume of an image's chain (base first), for the block-job calls."""

    volume_id: str
    format: str  # raw | qcow2
    path: str
    size: int  # virtual size in bytes
    shared: bool  # another live image also reads it


@dataclass(frozen=True)
class BlockJob(_AsDict):
    """A pull or commit, as QEMU reports it while it runs live and as the log has it
    otherwise (docs/adr/0028)."""

    job_id: str
    kind: str  # pull | commit | mirror
    cur: int  # bytes done, as QEMU counts them
    end: int  # bytes to do; may grow while a guest writes
    bandwidth: int  # bytes/s, 0 = unlimited
    state: str  # running | ready | completed | failed | aborted
    error: str | None


@dataclass(frozen=True)
class ImageInfo(_AsDict):
    image_id: str
    kind: str  # virtual-disk | snapshot
    size: int
    user_data: Any
    created: str  # ISO 8601, UTC
    chain_depth: int  # volumes a reader goes through; 1 for a standalone volume
    repo_id: str
