"""The repositories this host has connected, under the names it gave them, and finding images
among them: for the facade's calls, and for the executors, whose work may read an image of
another connected repository (a copy's source, architecture §1).

A host sees only the repositories it connects (ADR 0017). The registry is the one lock around
connecting, disconnecting and closing; lookups take a snapshot of it and read the views.

Imports: :mod:`engine.connections` (a connected repository), the aggregates, :mod:`engine.errors`,
:mod:`engine.validation`, the repository format's interface and the replicas' rules
(:mod:`engine.projections.replicas`).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from datetime import datetime

from engine import validation
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation
from engine.connections import ConnectedRepository
from engine.errors import (
    EngineClosed,
    ImageNotFound,
    ImageNotReady,
    RepositoryAlreadyConnected,
    RepositoryBusy,
    RepositoryNotConnected,
    StrataError,
)
from engine.formats.repository.driver import RepositoryStorage
from engine.projections.replicas import Replica, ReplicaSearch


class HostRepositories:
    """This host's connected repositories, by name."""

    def __init__(self) -> None:
        self._repos: dict[str, ConnectedRepository] = {}
        self._lock = threading.RLock()
        self._closed = False

    # --- connecting -----------------------------------------------------------------------

    def connect(
        self,
        repo_id: str,
        open_storage: Callable[[], RepositoryStorage],
        wire: Callable[[RepositoryStorage], ConnectedRepository],
    ) -> ConnectedRepository:
        """Connect the place ``open_storage`` opens under ``repo_id``, wired by ``wire``;
        refused if the name or the place is connected already. Under the lock throughout, so
        that two calls cannot connect one place twice."""
        with self._lock:
            self.check_open()
            if repo_id in self._repos:
                raise RepositoryAlreadyConnected(
                    repo_id=repo_id, path=self._repos[repo_id].storage.root
                )
            storage = open_storage()
            for other in self._repos.values():
                if os.path.realpath(other.storage.root) == os.path.realpath(storage.root):
                    raise RepositoryAlreadyConnected(repo_id=other.repo_id, path=storage.root)
            repo = self._repos[repo_id] = wire(storage)
            return repo

    def disconnect(self, repo_id: str, force: bool) -> None:
        """Detach; refused while this host runs stages there, unless ``force``."""
        with self._lock:
            repo = self[repo_id]
            if not force and repo.executor is not None and repo.executor.busy():
                raise RepositoryBusy(repo_id=repo_id)
            del self._repos[repo.repo_id]
        repo.close()

    def close(self) -> None:
        """Close every connection; no more calls are taken. Raises the first error met, once
        every connection was closed."""
        with self._lock:
            self._closed = True
            repos, self._repos = list(self._repos.values()), {}
        errors = []
        for repo in repos:
            try:
                repo.close()
            except StrataError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def check_open(self) -> None:
        if self._closed:
            raise EngineClosed()

    # --- repositories ---------------------------------------------------------------------

    def __getitem__(self, repo_id: str) -> ConnectedRepository:
        repo_id = validation.repo_id(repo_id)
        with self._lock:
            self.check_open()
            try:
                return self._repos[repo_id]
            except KeyError:
                raise RepositoryNotConnected(repo_id=repo_id) from None

    def all(self) -> list[ConnectedRepository]:
        with self._lock:
            return list(self._repos.values())

    def still_connected(self, repo: ConnectedRepository) -> None:
        """Raise if the engine was closed or ``repo`` disconnected (by another thread) since
        a waiter started: nothing would ever wake it otherwise."""
        with self._lock:
            self.check_open()
            if self._repos.get(repo.repo_id) is not repo:
                raise RepositoryNotConnected(repo_id=repo.repo_id)

    # --- images, for the facade -----------------------------------------------------------

    def live(self, repo: ConnectedRepository, image_id: uuid.UUID) -> Image:
        """The live image ``image_id`` of ``repo``; ImageNotFound says where it is instead."""
        image = repo.view.image(image_id)
        if image is None or image.removed:
            repo.follower.caught_up()  # maybe another host made it a moment ago
            image = repo.view.image(image_id)
        if image is None or image.removed:
            elsewhere = [
                r.repo_id
                for r in self.all()
                if r is not repo and (i := r.view.image(image_id)) is not None and not i.removed
            ]
            where = f"in repository {repo.repo_id!r}"
            if image is not None:
                where += " (it was removed)"
            if elsewhere:
                where += f"; it is in {elsewhere}"
            raise ImageNotFound(where, image_id=image_id)
        return image

    def image_in(
        self, repo_id: str, image_id: str | uuid.UUID
    ) -> tuple[ConnectedRepository, Image]:
        repo = self[repo_id]
        return repo, self.live(repo, validation.image_id(image_id))

    def find(
        self, image_id: uuid.UUID, opts: validation.Options
    ) -> tuple[ConnectedRepository, Image]:
        """Look for a live image where the options allow (architecture §1), else everywhere.

        Never a migration's replica (docs/adr/0029): it has the image's id but not yet its
        data, so nothing copies from it or is based on it; ImageNotReady if it is all there is.
        """
        hint = opts.image_hints.get(image_id)
        if hint is not None:
            repo = self[hint]
            hinted = self.live(repo, image_id)
            if hinted.replica_of is not None:
                raise replica_not_ready(hinted)
            return repo, hinted
        names = opts.participating_repositories
        repos = [self[n] for n in names] if names else self.all()
        replica: Image | None = None
        for caught_up in (False, True):
            for repo in repos:
                if caught_up:
                    repo.follower.caught_up()
                found = repo.view.image(image_id)
                if found is None or found.removed:
                    continue
                if found.replica_of is None:
                    return repo, found
                replica = found
        if replica is not None:
            raise replica_not_ready(replica)
        where = f"in {[r.repo_id for r in repos]}" if names else "in any connected repository"
        raise ImageNotFound(where, image_id=image_id)

    # --- images and volumes, for the executors and checks ---------------------------------

    def find_for_executor(self, image_id: uuid.UUID) -> tuple[Image, RepositoryStorage] | None:
        """Where executors read an image from. A snapshot's copy keeps its id (architecture §1), so
        one id can live in two repositories: a copy whose own volumes are still to be made is
        read from only if no other is there, or its copy stage would wait for itself. A
        migration's replica keeps the id too, and comes last: its files are being made."""
        # A source removed after the copy was asked for is still read, before a replica: its
        # data is freed only once nothing depends on it (ADR 0017).
        best: tuple[tuple[bool, bool, bool], Image, RepositoryStorage] | None = None
        for repo in self.all():
            image = repo.view.image(image_id)
            if image is None:
                continue
            unfinished = bool(set(image.chain) & image.pending_volumes())
            rank = (image.replica_of is not None, unfinished, image.removed)
            if rank == (False, False, False):
                return image, repo.storage
            if best is None or rank < best[0]:
                best = (rank, image, repo.storage)
        return None if best is None else (best[1], best[2])

    def needed_elsewhere(self, root: str) -> set[str]:
        """Volumes of the repository at ``root`` that unfinished work in the other connected
        repositories reads (a copy of one of its images, removed or not). A host sees only
        the repositories it connects (ADR 0017)."""
        repos = self.all()
        here = next((r for r in repos if r.storage.root == root), None)
        needed: set[str] = set()
        if here is None:
            return needed
        for other in repos:
            if other is here:
                continue
            for image in other.view.images():
                if image.removed:
                    continue
                for op in image.operations:
                    if op.finished:
                        continue
                    for stage in op.stages[op.done :]:
                        source = stage.get("source_image")
                        if source is None or (source == image.id_text and made(image)):
                            # An image that reads itself where it is whole (the optimize of
                            # one migrated there) reads nothing here, where it was before.
                            continue
                        found = here.view.image(str(source))
                        if found is not None:
                            needed.update(found.chain)
        return needed

    def writing_into(self, root: str) -> dict[str, Operation]:
        """The operations of the other connected repositories whose stages write into the
        repository at ``root`` (a migration's, docs/adr/0029), by id: whether one of their
        temporary files there is a leftover is their state's to say."""
        found: dict[str, Operation] = {}
        for other in self.all():
            if other.storage.root == root:
                continue
            for image in other.view.images():
                for op in image.operations:
                    if op.purpose in ops.MIGRATION and any(
                        stage.get("target") == root for stage in op.stages
                    ):
                        found[op.op_id] = op
        return found

    def replicas(self, root: str, participating: tuple[str, ...] | None = None) -> ReplicaSearch:
        """Where a check or a fix of the repository at ``root`` looks for replicas (docs/adr/
        0034): the other connected repositories, or only ``participating`` (names). A candidate
        whose chain's files are not all there, or that its own repository's last check (or a
        deep check's record) found lost, is left out: it cannot be read whole, or not as it
        was."""
        if participating is None:
            repos = [r for r in self.all() if r.storage.root != root]
        else:
            repos = [self[name] for name in participating]
            repos = [r for r in repos if r.storage.root != root]

        def find(image_id: uuid.UUID) -> list[Replica]:
            found = []
            for repo in repos:
                repo.follower.caught_up()
                image = repo.view.image(image_id)
                if image is None or not image.chain or image.removed:
                    continue
                # Rot a deep check found there, on whichever image owns the volume.
                damaged = repo.view.damaged()
                if any(ref in repo.lost or ref in damaged for ref in image.chain) or not all(
                    os.path.isfile(repo.storage.volume_path(*ops.split_ref(ref)))
                    for ref in image.chain
                ):
                    continue
                found.append(Replica(repo.repo_id, repo.storage.root, image))
            return found

        names = tuple(r.repo_id for r in repos)
        return ReplicaSearch(names, find, participating is not None)

    def at(self, root: str) -> ConnectedRepository | None:
        """The connected repository at ``root``, if any."""
        return next((r for r in self.all() if r.storage.root == root), None)

    def at_root(self, root: str) -> OtherRepository | None:
        """The connected repository at ``root``, as a migration's stage reaches it."""
        for repo in self.all():
            if repo.storage.root == root:
                return OtherRepository(repo)
        return None

    def foreign_ready(self, storage: RepositoryStorage, ref: str) -> bool:
        """Whether a volume of another connected repository is made: its file is there, or no
        unfinished stage there will make it (then it is lost, and a stage reading it fails)."""
        if os.path.exists(storage.volume_path(*ops.split_ref(ref))):
            return True
        for repo in self.all():
            if repo.storage.root == storage.root:
                return repo.view.is_ready(ref)
        return False


def made(image: Image) -> bool:
    """Whether none of the image's chain is still to be made (by a copy of it)."""
    return not (set(image.chain) & image.pending_volumes())


def replica_not_ready(image: Image) -> ImageNotReady:
    return ImageNotReady(
        f"a replica being filled by a migration from {image.replica_of}: nothing is copied "
        "from it or based on it until the migration switches to it (use the source)",
        image_id=image.id,
        status="broken",
    )


class OtherRepository:
    """A connected repository as a stage of another one reaches it (a migration's destination,
    engine/executors/migration_stages.py): its files, its images, and appends to its log."""

    def __init__(self, repo: ConnectedRepository) -> None:
        self._repo = repo

    @property
    def storage(self) -> RepositoryStorage:
        return self._repo.storage

    def image(self, image_id: uuid.UUID, /) -> Image | None:
        self._repo.follower.caught_up()
        return self._repo.view.image(image_id)

    def update(
        self, image_id: uuid.UUID, command: Callable[[Image, str, datetime], object], /
    ) -> None:
        service = self._repo.service
        service.update(image_id, lambda image: command(image, service.host_id, service.now()))
