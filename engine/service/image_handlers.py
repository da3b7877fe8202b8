"""The image calls of the storage API (create, snapshot, copy, remove) and the metadata calls.

Part of :class:`engine.facade.StorageEngine`, kept apart so each module reads in one sitting.
Each call validates everything first, then records its events in one log transaction.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from engine import planning, validation
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.errors import CommitUnknown, ImageNotFound, InvalidParameter, WrongImageKind
from engine.types import ImageInfo

if TYPE_CHECKING:
    from engine.connections import ConnectedRepository


class ImageCommands:
    if TYPE_CHECKING:
        host_id: str

        def _repo(self, repo_id: str) -> ConnectedRepository: ...
        def _image_in(
            self, repo_id: str, image_id: str | uuid.UUID
        ) -> tuple[ConnectedRepository, Image]: ...
        def _live(self, repo: ConnectedRepository, image_id: uuid.UUID) -> Image: ...
        def _find(
            self, image_id: uuid.UUID, opts: validation.Options
        ) -> tuple[ConnectedRepository, Image]: ...
        def _info(self, repo: ConnectedRepository, image: Image) -> ImageInfo: ...

    # --- the storage API's four operations -------------------------------------------------------

    def create_virtual_disk(
        self,
        target_repo_id: str,
        size: int,
        base_snapshot_id: str | uuid.UUID | None = None,
        user_data: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """A new mutable image, blank or with a snapshot's content; returns its id."""
        repo = self._repo(target_repo_id)
        size = validation.size(size)
        data = validation.user_data(user_data)
        opts = validation.options(options)
        key = ("create_virtual_disk", size, repr(base_snapshot_id), repr(data), repr(opts))
        new_id, committed = _retried_id(repo, key)
        if committed:
            return str(new_id)
        also: list[Image] = []
        if base_snapshot_id is None:
            chain, work = planning.blank_disk(size, opts.strategy)
            origin: dict[str, Any] = {"how": "blank"}
        else:
            snapshot_id = validation.image_id(base_snapshot_id, "base_snapshot_id")
            source_repo, snapshot = self._find(snapshot_id, opts)
            if snapshot.kind != ops.SNAPSHOT:
                raise WrongImageKind(
                    image_id=snapshot.id, kind=snapshot.kind, expected=ops.SNAPSHOT
                )
            if size < snapshot.size:
                raise InvalidParameter(
                    f"at least the snapshot's {snapshot.size} bytes, not {size}", name="size"
                )
            base_chain = snapshot.chain
            if source_repo is not repo:
                # Chains stay inside a repository (ADR 0004): build on a local copy of the
                # snapshot, under the snapshot's own id (or a new one, if a removed copy still
                # holds that id here), made first if it is not there yet.
                local = repo.view.image(snapshot.id)
                if local is not None and local.removed:
                    local = _live_copy_of(repo, snapshot.id) or local
                if local is None or local.removed:
                    copy_id = snapshot.id if local is None else uuid.uuid4()
                    base_chain, copy_work = planning.full_copy(snapshot.id, ops.SPACE)
                    also.append(self._request(
                        copy_id, ops.SNAPSHOT, snapshot.size, base_chain, snapshot.user_data,
                        opts, {"how": "copy", "of": str(snapshot.id)}, copy_work, repo,
                    ))  # fmt: skip
                else:
                    base_chain = local.chain
            chain, work = planning.disk_on_snapshot(size, base_chain, opts.strategy, new_id)
            origin = {"how": "snapshot", "of": str(snapshot.id)}
        image = self._request(new_id, ops.VIRTUAL_DISK, size, chain, data, opts, origin, work, repo)
        with _unsettled(repo, key, new_id):
            repo.service.add(*also, image)
        repo.follower.caught_up()
        return str(new_id)

    def create_snapshot(
        self,
        target_repo_id: str,
        base_virtual_disk_id: str | uuid.UUID,
        user_data: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """A new immutable image with the disk's current content; the disk stays writable."""
        repo, disk = self._image_in(target_repo_id, base_virtual_disk_id)
        data = validation.user_data(user_data)
        opts = validation.options(options)
        if disk.kind != ops.VIRTUAL_DISK:
            raise WrongImageKind(image_id=disk.id, kind=disk.kind, expected=ops.VIRTUAL_DISK)
        key = ("create_snapshot", str(disk.id), repr(data), repr(opts))
        new_id, committed = _retried_id(repo, key)
        if committed:
            return str(new_id)
        made: list[Image] = []

        def command(images: list[Image]) -> None:
            (current,) = images
            top, work = planning.snapshot_of_disk(
                current.id, current.chain, current.size, current.strategy
            )
            frozen = current.take_snapshot(
                snapshot_id=new_id,
                new_top=top,
                operations=[_held(p, opts) for p in work],
                host_id=self.host_id,
                now=repo.service.now(),
            )
            made[:] = [
                self._request(
                    new_id, ops.SNAPSHOT, current.size, frozen, data, opts,
                    {"how": "snapshot", "of": str(current.id)}, [], repo,
                )
            ]  # fmt: skip

        with _unsettled(repo, key, new_id):
            repo.service.update_many([disk.id], command, new=lambda: made)
        repo.follower.caught_up()
        return str(new_id)

    def copy_image(
        self,
        target_repo_id: str,
        image_id: str | uuid.UUID,
        base_image_id: str | uuid.UUID | None = None,
        user_data: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """Copy an image (usually to another repository); with a base, only the difference."""
        target = self._repo(target_repo_id)
        opts = validation.options(options)
        source_id = validation.image_id(image_id)
        data = validation.user_data(user_data) if user_data is not None else None
        base_id = (
            None if base_image_id is None else validation.image_id(base_image_id, "base_image_id")
        )
        source_repo, source = self._find(source_id, opts)
        if data is None:
            data = source.user_data
        origin: dict[str, Any] = {"how": "copy", "of": str(source.id)}
        key = ("copy_image", str(source.id), str(base_id), repr(data), repr(opts))
        new_id, committed = _retried_id(target, key)
        if committed:
            return str(new_id)
        if base_id is None:
            if source.kind == ops.SNAPSHOT and source_repo is not target:
                existing = target.view.image(source.id)
                if existing is not None and not existing.removed:
                    return str(source.id)  # the same immutable content is already there
                if existing is None:
                    new_id = source.id  # a copy of a snapshot keeps its id (architecture §1)
            chain, work = planning.full_copy(source.id, opts.strategy)
            image = self._request(
                new_id, source.kind, source.size, chain, data, opts, origin, work, target
            )
            with _unsettled(target, key, new_id):
                target.service.add(image)
            target.follower.caught_up()
            return str(new_id)
        base = self._live(target, base_id)
        origin["base"] = str(base.id)
        if base.kind == ops.SNAPSHOT:
            chain, work = planning.incremental_copy(source.id, base.chain, opts.strategy, new_id)
            image = self._request(
                new_id, source.kind, source.size, chain, data, opts, origin, work, target
            )
            with _unsettled(target, key, new_id):
                target.service.add(image)
        else:
            # A disk can still be written: freeze its current top (as a snapshot would, but
            # without a visible snapshot) so the copy's base never changes under it.
            made: list[Image] = []

            def command(images: list[Image]) -> None:
                (current,) = images
                top, base_work = planning.snapshot_of_disk(
                    current.id, current.chain, current.size, current.strategy
                )
                frozen = current.take_snapshot(
                    snapshot_id=None, new_top=top, operations=base_work,
                    host_id=self.host_id, now=target.service.now(),
                )  # fmt: skip
                chain, work = planning.incremental_copy(source.id, frozen, opts.strategy, new_id)
                made[:] = [self._request(
                    new_id, source.kind, source.size, chain, data, opts, origin, work, target
                )]  # fmt: skip

            with _unsettled(target, key, new_id):
                target.service.update_many([base.id], command, new=lambda: made)
        target.follower.caught_up()
        return str(new_id)

    def remove_image(
        self, repo_id: str, image_id: str | uuid.UUID, options: dict[str, Any] | None = None
    ) -> None:
        """Gone for users at once; its data is freed by clean and merge fixes later."""
        repo, image = self._image_in(repo_id, image_id)
        validation.options(options)
        self._update(
            repo, image.id, lambda i: i.remove(host_id=self.host_id, now=repo.service.now())
        )

    # --- metadata -------------------------------------------------------------------------

    def list_images(self, repo_id: str) -> list[ImageInfo]:
        repo = self._repo(repo_id)
        return [self._info(repo, i) for i in repo.view.live_images()]

    def get_image_info(self, repo_id: str, image_id: str | uuid.UUID) -> ImageInfo:
        repo, image = self._image_in(repo_id, image_id)
        return self._info(repo, image)

    def set_user_data(self, repo_id: str, image_id: str | uuid.UUID, user_data: Any) -> None:
        repo, image = self._image_in(repo_id, image_id)
        data = validation.user_data(user_data)
        self._update(
            repo, image.id,
            lambda i: i.set_user_data(user_data=data, host_id=self.host_id, now=repo.service.now()),
        )  # fmt: skip

    def resize_virtual_disk(self, repo_id: str, image_id: str | uuid.UUID, new_size: int) -> None:
        """Grow a virtual disk (its top volume); shrinking is refused."""
        repo, image = self._image_in(repo_id, image_id)
        size = validation.size(new_size, "new_size")
        if image.kind != ops.VIRTUAL_DISK:
            raise WrongImageKind(image_id=image.id, kind=image.kind, expected=ops.VIRTUAL_DISK)
        self._update(
            repo, image.id,
            lambda i: i.resize(
                size=size, op=planning.resize(i.chain[-1], size),
                host_id=self.host_id, now=repo.service.now(),
            ),
        )  # fmt: skip

    # --- helpers --------------------------------------------------------------------------

    def _update(
        self, repo: ConnectedRepository, image_id: uuid.UUID, command: Callable[[Image], object]
    ) -> None:
        try:
            repo.service.update(image_id, command)
        except ImageNotFound:
            raise ImageNotFound(f"in repository {repo.repo_id!r}", image_id=image_id) from None
        repo.follower.caught_up()

    def _request(
        self,
        image_id: uuid.UUID,
        kind: str,
        size: int,
        chain: list[str],
        user_data: Any,
        opts: validation.Options,
        origin: dict[str, Any],
        work: list[ops.OperationPlan],
        repo: ConnectedRepository,
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
            host_id=self.host_id,
            now=repo.service.now(),
        )


def _held(plan: ops.OperationPlan, opts: validation.Options) -> ops.OperationPlan:
    """An operation that waits for a fix when the caller asked for ``auto_fix=False``."""
    return plan if opts.auto_fix else {**plan, "held": True}


def _live_copy_of(repo: ConnectedRepository, image_id: uuid.UUID) -> Image | None:
    """A live snapshot in ``repo`` copied from ``image_id`` under another id."""
    for image in repo.view.live_images():
        origin = image.origin
        if (
            image.kind == ops.SNAPSHOT
            and origin.get("how") == "copy"
            and origin.get("of") == str(image_id)
        ):
            return image
    return None


def _retried_id(repo: ConnectedRepository, key: tuple[object, ...]) -> tuple[uuid.UUID, bool]:
    """The id for a new image made by the call ``key`` (its name and arguments), and whether
    it exists already. A new one, unless the same call raised :class:`CommitUnknown` before:
    then the id that call tried, so that the retry finds the image if that commit happened
    after all, or makes it under the same id if not (architecture §6: a retry is safe)."""
    earlier = repo.unsettled.pop(key, None)
    if earlier is None:
        return uuid.uuid4(), False
    repo.follower.caught_up()
    return earlier, repo.view.image(earlier) is not None


@contextlib.contextmanager
def _unsettled(
    repo: ConnectedRepository, key: tuple[object, ...], new_id: uuid.UUID
) -> Iterator[None]:
    try:
        yield
    except CommitUnknown:
        repo.unsettled[key] = new_id
        raise
