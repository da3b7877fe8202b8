"""The image commands: create a virtual disk, take a snapshot, copy, remove, resize, set user
data, prepare for and tear down from a virtual machine (architecture §3).

One :class:`ImageHandlers` serves one repository on behalf of one host. Its caller (the facade)
has validated the arguments and found the images a call names; a handler plans the work
(:mod:`engine.planning`), lets the aggregates decide, saves what they recorded in one log
transaction through the unit of work, and returns what the call returns: the new image's id.

Imports: :mod:`engine.aggregates`, :mod:`engine.planning`, :mod:`engine.validation` (the options'
type), :mod:`engine.errors` and :mod:`engine.service.unit_of_work`. What a handler reads of the
repository's view is the :class:`ImageLookup` protocol, never the projection itself.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

from engine import planning
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.errors import CommitUnknown, ImageNotFound, InvalidParameter, WrongImageKind
from engine.service.unit_of_work import ImageService
from engine.validation import Options


class ImageLookup(Protocol):
    """The images of one repository as its view holds them (engine/projections/view.py)."""

    def image(self, image_id: uuid.UUID | str) -> Image | None: ...

    def live_images(self) -> list[Image]: ...


class ImageHandlers:
    """The image commands of one repository, on behalf of the host ``service`` works for."""

    def __init__(self, repo_id: str, service: ImageService, view: ImageLookup) -> None:
        self.repo_id = repo_id
        self.service = service
        self.view = view
        # Image ids that calls tried when their commit's outcome was unknown (CommitUnknown),
        # by call and arguments: a retry of the same call uses the same id (architecture §6).
        self._unsettled: dict[tuple[object, ...], uuid.UUID] = {}

    # --- the storage API's four operations -------------------------------------------------------

    def create_virtual_disk(
        self,
        size: int,
        user_data: Any,
        opts: Options,
        snapshot: Image | None = None,
        *,
        snapshot_elsewhere: bool = False,
    ) -> uuid.UUID:
        """A new disk, blank or on ``snapshot`` (found in another repository if
        ``snapshot_elsewhere``)."""
        base = None if snapshot is None else str(snapshot.id)
        key = ("create_virtual_disk", size, base, repr(user_data), repr(opts))
        new_id, committed = self._retried_id(key)
        if committed:
            return new_id
        also: list[Image] = []
        if snapshot is None:
            chain, work = planning.blank_disk(size, opts.strategy)
            origin: dict[str, Any] = {"how": "blank"}
        else:
            if snapshot.kind != ops.SNAPSHOT:
                raise WrongImageKind(
                    image_id=snapshot.id, kind=snapshot.kind, expected=ops.SNAPSHOT
                )
            if size < snapshot.size:
                raise InvalidParameter(
                    f"at least the snapshot's {snapshot.size} bytes, not {size}", name="size"
                )
            base_chain = snapshot.chain
            if snapshot_elsewhere:
                # Chains stay inside a repository (ADR 0004): build on a local copy of the
                # snapshot, under the snapshot's own id (or a new one, if a removed copy still
                # holds that id here), made first if it is not there yet.
                # A migration's replica of the snapshot holds its id here but not yet its data
                # (docs/adr/0029): like a removed copy, it is no base.
                local = self.view.image(snapshot.id)
                if local is not None and (local.removed or local.replica_of is not None):
                    local = self._live_copy_of(snapshot.id) or local
                if local is None or local.removed or local.replica_of is not None:
                    copy_id = snapshot.id if local is None else uuid.uuid4()
                    base_chain, copy_work = planning.full_copy(snapshot.id, ops.SPACE)
                    also.append(self._request(
                        copy_id, ops.SNAPSHOT, snapshot.size, base_chain, snapshot.user_data,
                        opts, {"how": "copy", "of": str(snapshot.id)}, copy_work,
                    ))  # fmt: skip
                else:
                    base_chain = local.chain
            chain, work = planning.disk_on_snapshot(size, base_chain, opts.strategy, new_id)
            origin = {"how": "snapshot", "of": str(snapshot.id)}
        image = self._request(new_id, ops.VIRTUAL_DISK, size, chain, user_data, opts, origin, work)
        with self._unsettled_if_unknown(key, new_id):
            self.service.add(*also, image)
        return new_id

    def create_snapshot(self, disk: Image, user_data: Any, opts: Options) -> uuid.UUID:
        """A new snapshot of ``disk``'s current content; the disk stays writable."""
        if disk.kind != ops.VIRTUAL_DISK:
            raise WrongImageKind(image_id=disk.id, kind=disk.kind, expected=ops.VIRTUAL_DISK)
        key = ("create_snapshot", str(disk.id), repr(user_data), repr(opts))
        new_id, committed = self._retried_id(key)
        if committed:
            return new_id

        def command(images: list[Image]) -> Image:
            (current,) = images
            top, work = planning.snapshot_of_disk(
                current.id, current.chain, current.size, current.strategy
            )
            frozen = current.take_snapshot(
                snapshot_id=new_id,
                new_top=top,
                operations=[_held(p, opts) for p in work],
                host_id=self.service.host_id,
                now=self.service.now(),
            )
            # The snapshot's own work: the digest of the volume it freezes (held, like all
            # work, with auto_fix=False; the snapshot is usable meanwhile).
            digest = planning.snapshot_digest(frozen, top)
            return self._request(
                new_id, ops.SNAPSHOT, current.size, frozen, user_data, opts,
                {"how": "snapshot", "of": str(current.id)}, [digest],
            )  # fmt: skip

        with self._unsettled_if_unknown(key, new_id):
            snapshot = self.service.update_many([disk.id], command, new=lambda image: [image])
        return snapshot.id

    def copy_image(
        self,
        source: Image,
        user_data: Any,
        opts: Options,
        base: Image | None = None,
        *,
        source_elsewhere: bool = False,
    ) -> uuid.UUID:
        """A copy of ``source`` here (found in another repository if ``source_elsewhere``);
        with ``base`` (an image here), only the difference. Returns the copy's id."""
        origin: dict[str, Any] = {"how": "copy", "of": str(source.id)}
        base_id = None if base is None else base.id
        key = ("copy_image", str(source.id), str(base_id), repr(user_data), repr(opts))
        new_id, committed = self._retried_id(key)
        if committed:
            return new_id
        if base is None:
            if source.kind == ops.SNAPSHOT and source_elsewhere:
                existing = self.view.image(source.id)
                if existing is not None and not existing.removed and existing.replica_of is None:
                    return source.id  # the same immutable content is already there
                # A migration's replica holds the id here, its data not yet: a copy of its own.
                if existing is None:
                    new_id = source.id  # a copy of a snapshot keeps its id (architecture §1)
            chain, work = planning.full_copy(source.id, opts.strategy)
            image = self._request(
                new_id, source.kind, source.size, chain, user_data, opts, origin, work
            )
            with self._unsettled_if_unknown(key, new_id):
                self.service.add(image)
            return new_id
        origin["base"] = str(base.id)
        if base.kind == ops.SNAPSHOT:
            chain, work = planning.incremental_copy(source.id, base.chain, opts.strategy, new_id)
            image = self._request(
                new_id, source.kind, source.size, chain, user_data, opts, origin, work
            )
            with self._unsettled_if_unknown(key, new_id):
                self.service.add(image)
            return new_id

        # A disk can still be written: freeze its current top (as a snapshot would, but
        # without a visible snapshot) so the copy's base never changes under it.
        def command(images: list[Image]) -> Image:
            (current,) = images
            top, base_work = planning.snapshot_of_disk(
                current.id, current.chain, current.size, current.strategy
            )
            frozen = current.take_snapshot(
                snapshot_id=None, new_top=top, operations=base_work,
                host_id=self.service.host_id, now=self.service.now(),
            )  # fmt: skip
            chain, work = planning.incremental_copy(source.id, frozen, opts.strategy, new_id)
            return self._request(
                new_id, source.kind, source.size, chain, user_data, opts, origin, work
            )

        with self._unsettled_if_unknown(key, new_id):
            copy = self.service.update_many([base.id], command, new=lambda image: [image])
        return copy.id

    def remove_image(self, image_id: uuid.UUID) -> None:
        """Gone for users at once; its data is freed by clean and merge fixes later."""
        self._update(image_id, lambda i: i.remove(host_id=self.service.host_id, now=self._now()))

    # --- metadata and virtual machines ------------------------------------------------------------

    def set_user_data(self, image_id: uuid.UUID, user_data: Any) -> None:
        self._update(
            image_id,
            lambda i: i.set_user_data(
                user_data=user_data, host_id=self.service.host_id, now=self._now()
            ),
        )

    def resize_virtual_disk(self, image: Image, size: int) -> None:
        """Grow a virtual disk (its top volume); shrinking is refused by the aggregate."""
        if image.kind != ops.VIRTUAL_DISK:
            raise WrongImageKind(image_id=image.id, kind=image.kind, expected=ops.VIRTUAL_DISK)
        self._update(
            image.id,
            lambda i: i.resize(
                size=size, op=planning.resize(i.chain[-1], size),
                host_id=self.service.host_id, now=self._now(),
            ),
        )  # fmt: skip

    def prepare_image(self, image_id: uuid.UUID) -> None:
        """Record that a virtual machine on this host opens the image."""
        self.service.update(
            image_id, lambda i: i.prepare(host_id=self.service.host_id, now=self._now())
        )

    def attach_image(self, image_id: uuid.UUID) -> None:
        """Record that this host's daemon serves the image (ImageInUse if another host has it)."""
        self.service.update(
            image_id, lambda i: i.attach(host_id=self.service.host_id, now=self._now())
        )

    def teardown_image(self, image_id: uuid.UUID) -> None:
        self.service.update(
            image_id, lambda i: i.tear_down(host_id=self.service.host_id, now=self._now())
        )

    # --- helpers --------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.service.now()

    def _update(self, image_id: uuid.UUID, command: Callable[[Image], object]) -> None:
        try:
            self.service.update(image_id, command)
        except ImageNotFound:
            raise ImageNotFound(f"in repository {self.repo_id!r}", image_id=image_id) from None

    def _request(
        self,
        image_id: uuid.UUID,
        kind: str,
        size: int,
        chain: list[str],
        user_data: Any,
        opts: Options,
        origin: dict[str, Any],
        work: list[ops.OperationPlan],
    ) -> Image:
        return Image.request(
            image_id=image_id,
            kind=kind,
            size=size,
            chain=chain,
            user_data=user_data,
            strategy=opts.strategy,
            auto_fix=opts.auto_fix,
            origin=origin,
            operations=work,
            host_id=self.service.host_id,
            now=self.service.now(),
        )

    def _live_copy_of(self, image_id: uuid.UUID) -> Image | None:
        """A live snapshot here copied from ``image_id`` under another id."""
        for image in self.view.live_images():
            origin = image.origin
            if (
                image.kind == ops.SNAPSHOT
                and origin.get("how") == "copy"
                and origin.get("of") == str(image_id)
            ):
                return image
        return None

    def _retried_id(self, key: tuple[object, ...]) -> tuple[uuid.UUID, bool]:
        """The id for a new image made by the call ``key`` (its name and arguments), and
        whether it exists already. A new one, unless the same call raised
        :class:`CommitUnknown` before: then the id that call tried, so that the retry finds the
        image if that commit happened after all, or makes it under the same id if not
        (architecture §6: a retry is safe). The log, not the view, says whether it happened."""
        earlier = self._unsettled.pop(key, None)
        if earlier is None:
            return uuid.uuid4(), False
        try:
            return earlier, self.service.exists(earlier)
        except BaseException:
            self._unsettled.setdefault(key, earlier)  # still unknown: the next retry asks again
            raise

    @contextlib.contextmanager
    def _unsettled_if_unknown(self, key: tuple[object, ...], new_id: uuid.UUID) -> Iterator[None]:
        try:
            yield
        except CommitUnknown:
            self._unsettled[key] = new_id
            raise


def _held(plan: ops.OperationPlan, opts: Options) -> ops.OperationPlan:
    """An operation that waits for a fix when the caller asked for ``auto_fix=False``."""
    return plan if opts.auto_fix else {**plan, "held": True}
