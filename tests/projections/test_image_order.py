"""Images sort by id without making the ids' strings, in the same order as the strings."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from engine.aggregates.image import Image
from engine.projections.folded_state import by_id


def image(image_id: uuid.UUID) -> Image:
    i = Image()
    i.id = image_id
    return i


@given(st.lists(st.uuids() | st.integers(0, 2**128 - 1).map(lambda n: uuid.UUID(int=n))))
def test_images_sort_by_id_as_their_id_strings_do(ids: list[uuid.UUID]) -> None:
    images = [image(i) for i in ids]
    assert sorted(images, key=by_id) == sorted(images, key=lambda i: str(i.id))
