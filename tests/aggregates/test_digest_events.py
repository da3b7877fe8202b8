"""``VolumeDigested`` (docs/adr/0031): recorded on an image's volume, kept on a removed image,
refused for a volume outside the chain, and carried exactly through the log to another host,
its view and the view's read model."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest

from engine.errors import InvalidParameter
from engine.projections import folded_state
from tests.aggregates.test_image import NOW, disk, run_all, vol
from tests.projections.projection_log import Repo

CHUNKS = hashlib.sha256(b"a").digest() + hashlib.sha256(b"b").digest()


def digest_of(image_volume: str) -> dict[str, object]:
    return {"volume": image_volume, "size": 3 << 20, "chunk_size": 2 << 20, "chunks": CHUNKS,
            "digest": "ab" * 32}  # fmt: skip


def test_a_digest_is_recorded_for_a_volume_of_the_chain_and_kept_when_removed() -> None:
    image = disk()
    run_all(image)
    assert image.digests == {}
    image.record_digest(**digest_of(vol(1)), host_id="a", now=NOW)  # type: ignore[arg-type]
    before = image.digests
    image.remove(host_id="a", now=NOW)
    image.record_digest(**{**digest_of(vol(1)), "digest": "cd" * 32}, host_id="a", now=NOW)  # type: ignore[arg-type]
    assert before[vol(1)]["digest"] == "ab" * 32  # replaced, not changed in place
    assert image.digests[vol(1)] == {"size": 3 << 20, "chunk_size": 2 << 20, "chunks": CHUNKS,
                                     "digest": "cd" * 32}  # fmt: skip
    twin = folded_state.decode(folded_state.encode(image, None))[0]
    assert twin.digests == image.digests


def test_a_digest_of_a_volume_outside_the_chain_is_refused() -> None:
    image = disk()
    run_all(image)
    with pytest.raises(InvalidParameter):
        image.record_digest(**digest_of(vol(9)), host_id="a", now=NOW)  # type: ignore[arg-type]
    assert image.digests == {}


def test_a_digest_comes_back_exactly_from_the_log_on_another_host() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "log"
        writer = Repo(log_dir)
        image_id = writer.disk()
        ref = writer.get(image_id).chain[-1]
        writer.service.update(
            image_id,
            lambda i: i.record_digest(**digest_of(ref), host_id="host-a", now=NOW),  # type: ignore[arg-type]
        )
        writer.app.close()
        reader = Repo(log_dir, "host-b", create=False)
        try:
            assert reader.get(image_id).digests[ref]["chunks"] == CHUNKS
            db_path = Path(tmp) / "view.db"
            reader.view(db_path).close()
            reloaded = reader.view(db_path)
            image = reloaded.image(image_id)
            assert image is not None and image.digests[ref]["chunks"] == CHUNKS
            reloaded.close()
        finally:
            reader.app.close()
