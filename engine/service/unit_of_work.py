"""Running commands on images: load the aggregates, let them decide, save what they recorded.

The one place where commands meet the event store. A command is a function of the freshly loaded
aggregates; when another host or thread appended to one of them between our load and our save,
the log refuses the save (optimistic concurrency) and the command runs again on the new state,
so every decision is taken on the state it is recorded against. A command returns what its
caller returns (a new image, a claim's epoch), and the unit of work hands it back.

Imports: :mod:`engine.aggregates`, :mod:`engine.application` (the event store over the log) and
:mod:`engine.errors`. Everything that writes an image's events goes through here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from engine.aggregates.image import Image
from engine.application import StrataLogApplication
from engine.errors import ConcurrencyConflict, ImageNotFound

T = TypeVar("T")
MAX_ATTEMPTS = 50
logger = logging.getLogger("engine.service")


def utc_now() -> datetime:
    return datetime.now(tz=UTC)


class ImageService:
    """Commands on the images of one repository, on behalf of one host."""

    def __init__(
        self,
        app: StrataLogApplication,
        host_id: str,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.app = app
        self.host_id = host_id
        self.clock = clock

    def get(self, image_id: uuid.UUID) -> Image:
        """The image as the log holds it now (removed images included)."""
        try:
            image: Image = self.app.repository.get(image_id, projector_func=Image.project)
        except AggregateNotFoundError as e:
            raise ImageNotFound("in this repository", image_id=image_id) from e
        return image

    def exists(self, image_id: uuid.UUID) -> bool:
        try:
            self.get(image_id)
        except ImageNotFound:
            return False
        return True

    def add(self, *images: Image) -> None:
        """Save new images (and any other aggregates given) in one transaction."""
        self._save(images)

    def update(self, image_id: uuid.UUID, command: Callable[[Image], T]) -> T:
        """Run ``command`` on the current state of one image and save what it recorded."""
        return self.update_many([image_id], lambda images: command(images[0]))

    def update_many(
        self,
        image_ids: Sequence[uuid.UUID],
        command: Callable[[list[Image]], T],
        *,
        new: Callable[[T], Sequence[Image]] | None = None,
    ) -> T:
        """Run ``command`` on several images and return what it returns; save their events
        atomically, with the new aggregates ``new`` picks from that result (none by default)."""
        for attempt in range(MAX_ATTEMPTS):
            images = [self.get(i) for i in image_ids]
            result = command(images)
            try:
                self._save([*images, *(() if new is None else new(result))])
            except ConcurrencyConflict as e:
                if attempt == MAX_ATTEMPTS - 1:
                    logger.warning(
                        "gave up after %d attempts: images %s kept changing under the command",
                        MAX_ATTEMPTS, [str(i) for i in image_ids],
                        extra={"host": self.host_id, "images": [str(i) for i in image_ids]},
                    )  # fmt: skip
                    raise
                logger.debug(
                    "images %s changed under the command (%s): running it again, attempt %d",
                    [str(i) for i in image_ids], e, attempt + 2,
                    extra={"host": self.host_id},
                )  # fmt: skip
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _save(self, aggregates: Sequence[Image]) -> None:
        try:
            self.app.save(*aggregates)
        except IntegrityError as e:
            cause = e.__cause__
            if isinstance(cause, ConcurrencyConflict):
                raise cause from e
            raise ConcurrencyConflict(str(e)) from e  # the library named no aggregate

    def now(self) -> datetime:
        return self.clock()
