"""Recording a volume's digest the way a snapshot's digest stage does (docs/adr/0031), computed
here from the file: for tests that need a digest in the log before rot is made."""

from __future__ import annotations

import uuid

from engine.formats.qemu.digests import digest_image
from engine.service.unit_of_work import ImageService


def record_file_digest(
    service: ImageService, image_id: uuid.UUID, ref: str, path: str, host_id: str
) -> None:
    """Append ``VolumeDigested`` of volume ``ref`` (its file at ``path``) to the image."""
    digest = digest_image(path, ref.rsplit(".", 1)[1])
    service.update(
        image_id,
        lambda image: image.record_digest(
            volume=ref,
            size=digest.size,
            chunk_size=digest.chunk_size,
            chunks=digest.chunks,
            digest=digest.digest,
            host_id=host_id,
            now=service.now(),
        ),
    )
