"""How an attached image appears in its host's storage daemon: names of exports, nodes and jobs.

One image is one NBD export named after it; each volume of its chain is one block node named
after the image and the volume, so a node keeps its name when the chain grows a top (a live
snapshot) or loses volumes (a pull, a commit), and two attached images that read one volume
open it as two nodes. A job is named after its operation and stage, so a restarted engine finds
the job its predecessor started (docs/adr/0028-live-operations-as-stages.md).

QEMU wants names that start with a letter, node names of at most 31 characters with the
adapter's ``-file`` suffix; 8 + 13 hex digits of two random ids and 4 of the volume's directory
keep them apart on one host.

Imports: ``engine.aggregates``; of ``engine.formats``, the storage daemon adapter and the
repository driver.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid

from engine.aggregates.image import Image
from engine.aggregates.operations import split_ref
from engine.formats.qemu.storage_daemon import ChainVolume
from engine.formats.repository.driver import RepositoryStorage

_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]")


def export_name(image_id: uuid.UUID) -> str:
    """The NBD export of an image: its id (a letter first, as QEMU wants)."""
    return f"i{image_id.hex}"


def node_name(image_id: uuid.UUID, ref: str, path: str) -> str:
    """The block node of volume ``ref`` (its file at ``path``) in the attached chain of image
    ``image_id``. A migration opens the image's volumes of two repositories at once, under the
    same ids (docs/adr/0029): 4 hex digits of the directory's hash keep them apart."""
    volume_id, _ = split_ref(ref)
    where = hashlib.blake2b(os.path.dirname(path).encode(), digest_size=2).hexdigest()
    return f"n{image_id.hex[:8]}{volume_id[:13]}{where}"


def mirror_job_name(image_id: uuid.UUID) -> str:
    """The mirror of a migration: one per image at a time, found by every stage after the one
    that started it (docs/adr/0029)."""
    return f"m{image_id.hex[:24]}"


def job_name(op_id: str, index: int) -> str:
    """The block job of stage ``index`` of operation ``op_id``: the same on every attempt."""
    return f"j{_NOT_ALNUM.sub('', op_id)[:24]}-{index}"


def dead_host(host_id: str) -> str:
    """Why an image attached on ``host_id`` is not any more (``AttachmentReleased``)."""
    return f"host {host_id} is dead (its heartbeat expired), its daemon too"


def chain_volumes(image: Image, storage: RepositoryStorage) -> list[ChainVolume]:
    """The image's chain, base first, as the daemon opens it."""
    return [volume_of(image, ref, storage.volume_path(*split_ref(ref))) for ref in image.chain]


def volume_of(image: Image, ref: str, path: str) -> ChainVolume:
    """Volume ``ref`` (its file at ``path``) as a node of ``image``'s chain in the daemon."""
    return ChainVolume(node_name(image.id, ref, path), path, split_ref(ref)[1])
