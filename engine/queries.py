"""The storage API's reads: an image's status and info, a repository's description, what a check
finds, which image a path is, and whether an image's work has settled (architecture §3, step 6).

They answer from a connected repository's view, and look at the files only where a status or a
check must (one ``lstat`` per volume, the headers of volumes not seen sound before). They write
nothing to the log; a check remembers what it found lost, so that statuses say so (ADR 0017).

Imports: :mod:`engine.connections`, the aggregates, the projections' status and check rules,
:mod:`engine.volume_health`, the deep check's carriers (:mod:`engine.service.check_handlers`),
:mod:`engine.opaque`, :mod:`engine.errors` and :mod:`engine.types`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import engine.projections.check as fix_rules
from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation
from engine.aggregates.stage_kinds import has_live_form
from engine.connections import ConnectedRepository
from engine.errors import ForeignFile, ImageNotReady
from engine.opaque import value_of
from engine.projections.status import blocker, image_status
from engine.projections.view import RepositoryView
from engine.service.check_handlers import is_deep_check
from engine.types import BROKEN, Fix, ImageInfo, ImageStatus
from engine.volume_health import find_damaged, identities, volume_faults


def status_of(repo: ConnectedRepository, image: Image) -> ImageStatus:
    """The image's status, its volumes looked at: a missing file (one ``lstat`` each) or a
    volume the last check found damaged, not made again since, makes it broken, and says so
    (ADR 0017)."""
    faults = volume_faults(repo.storage, repo.view, image, repo.lost)
    status = image_status(image, repo.view, (), faults)
    if image.replica_of is not None:
        return replica_status(image, status)
    if status.status == BROKEN and status.last_error is None:
        why = blocker(image, repo.view)
        if why is not None:
            return dataclasses.replace(status, last_error=why)
    return status


def replica_status(image: Image, status: ImageStatus) -> ImageStatus:
    """A replica being filled by a migration is not usable yet: broken, saying why."""
    why = f"a replica being filled by a migration from {image.replica_of}"
    return dataclasses.replace(status, status=BROKEN, last_error=why)


def migrated_to(view: RepositoryView, image_id: uuid.UUID) -> str | None:
    """The root of the repository the image was migrated to, if it was (removed here by the
    switch of a migration: docs/adr/0029)."""
    image = view.image(image_id)
    if image is None or not image.removed:
        return None
    for op in reversed(image.operations):
        last = op.stages[-1] if op.stages else None
        if op.finished and not op.aborted and last is not None and last.get("do") == "switch":
            target = last.get("target")
            return target if isinstance(target, str) else None
    return None


def migration_ended(
    repos: list[ConnectedRepository], here: ConnectedRepository, replica: Image
) -> bool:
    """Whether the source is done with ``replica`` (a migration's, or the image it became): it
    runs no replication to it any more (switched and removed, or aborted), or its migration
    failed or was stopped. Unknown without the source connected: done once switched."""
    source = next((r for r in repos if r.storage.root == replica.origin.get("of")), None)
    if source is None:
        return replica.replica_of is None  # switched; the source is not known here
    source.follower.caught_up()
    image = source.view.image(replica.id)
    if image is None or image.removed or image.replicating_to != here.storage.root:
        return True
    op = image.current_operation()
    return op is not None and op.state in (ops.FAILED, ops.STOPPED)


def info_of(repo: ConnectedRepository, image: Image) -> ImageInfo:
    return ImageInfo(
        image_id=str(image.id),
        kind=image.kind,
        size=image.size,
        user_data=value_of(image.user_data),
        created=image.created_on.isoformat(),
        chain_depth=len(image.chain),
        repo_id=repo.repo_id,
    )


def describe(repo: ConnectedRepository) -> dict[str, Any]:
    """The repository's format and free space, and its images counted by kind and status.
    A migration's replica is not an image of the repository yet (``list_images`` leaves it
    out too): it is counted apart, under ``replicas``."""
    live, replicas = [], 0
    for image in repo.view.live_images():
        if image.replica_of is None:
            live.append(image)
        else:
            replicas += 1
    by_status: dict[str, int] = {}
    for image in live:
        status = status_of(repo, image).status
        by_status[status] = by_status.get(status, 0) + 1
    return {
        **repo.storage.describe(),
        "repo_id": repo.repo_id,
        "images": len(live),
        "virtual_disks": sum(1 for i in live if i.kind == ops.VIRTUAL_DISK),
        "snapshots": sum(1 for i in live if i.kind == ops.SNAPSHOT),
        "removed_images": sum(1 for i in repo.view.images() if i.removed),
        "replicas": replicas,
        "by_status": by_status,
        "log_position": repo.view.position,
        "deep_check": running_deep_check(repo.view),
    }


def deep_check_carrier(repo: ConnectedRepository, image_id: uuid.UUID) -> Image | None:
    """The carrier of a deep check (docs/adr/0033) with that id, if it is one: ``stop_fix``
    takes it, though it is no live image."""
    image = repo.view.image(image_id)
    return image if image is not None and is_deep_check(image) else None


def running_deep_check(view: RepositoryView) -> dict[str, Any] | None:
    """The deep check in progress, if any (the latest asked for): the id of its carrier,
    which ``stop_fix`` takes, and how far it got (-1 before it started) (docs/adr/0033)."""
    running = [
        image
        for image in view.images()
        if is_deep_check(image)
        and (op := image.current_operation()) is not None
        and op.state == ops.PENDING
    ]
    if not running:
        return None
    latest = max(running, key=lambda image: image.created_on)
    op = latest.current_operation()
    return {"image_id": latest.id_text, "percent_complete": -1 if op is None else op.percent}


def check(
    repo: ConnectedRepository,
    elsewhere: Collection[str],
    writers: Mapping[str, Operation] | None = None,
    *,
    replicas: fix_rules.ReplicaSearch = fix_rules.NO_SEARCH,
) -> list[Fix]:
    """Compare the view with the files; the fixes that would help. ``elsewhere``: volumes here
    that unfinished work in other connected repositories reads; ``writers``: their operations
    that write temporary files here (a migration's), by id; ``replicas``: where copies of its
    snapshots are, to mend their lost volumes from (docs/adr/0034)."""
    unlisted: ForeignFile | None = None
    try:
        files = repo.storage.list_volume_files()
    except ForeignFile as e:  # the volume directory: reported, never listed through
        files, unlisted = [], e
    # Never a header read through a foreign file: it may be a file outside.
    # What deep checks found (the log's word, on every host) counts as lost too: the fix
    # rules read it from the view (ADR 0033).
    damaged = find_damaged(repo.view, [f for f in files if f.foreign is None], repo.sound_headers)
    problems = fix_rules.find_problems(
        repo.view,
        files,
        damaged=damaged,
        elsewhere=elsewhere,
        unlisted=unlisted,
        writers=writers,
        replicas=replicas,
    )
    repo.lost = identities(repo.storage, problems.lost)
    return list(problems.fixes)


def check_usable(repo: ConnectedRepository, image: Image) -> None:
    """Raise what keeps a virtual machine from using the image: ImageNotReady when it is broken,
    ForeignFile when a volume of its chain is not the repository's own file."""
    status = status_of(repo, image)
    if status.status == BROKEN:
        raise ImageNotReady(
            status.last_error or f"its work is at stage {status.stage}",
            image_id=image.id,
            status=status.status,
        )
    check_chain_is_own(repo, image)


def check_chain_is_own(repo: ConnectedRepository, image: Image) -> None:
    """Raise ForeignFile if a volume of the image's chain is not the repository's own file
    (a virtual machine reads the whole chain, and follows links: ADR 0016)."""
    for ref in image.chain:
        try:
            repo.storage.check_own_file(repo.storage.volume_path(*ops.split_ref(ref)))
        except ForeignFile:
            # Broken from now on, as the next check will say too.
            repo.lost.update(identities(repo.storage, [ref]))
            raise


def image_at_path(
    repos: Iterable[ConnectedRepository], path: str
) -> tuple[ConnectedRepository, Image] | None:
    """The live image whose top volume is ``path`` (what a virtual machine has open)."""
    wanted = os.path.realpath(path)
    for repo in repos:
        # The repository's own path to each volume: its root may be a link, but a link
        # inside it leads to a file that is not the image's (docs/adr/0016).
        root = repo.storage.root
        real_root = os.path.realpath(root)
        for image in repo.view.live_images():
            if image.replica_of is not None:
                continue  # not the image yet: its source's file is what a machine has open
            volume_id, fmt = ops.split_ref(image.chain[-1])
            own = os.path.relpath(repo.storage.volume_path(volume_id, fmt), root)
            if os.path.join(real_root, own) == wanted:
                return repo, image
    return None


def settled(view: RepositoryView, image: Image) -> bool:
    """Whether ``wait_for_image`` is done: no stage of the image, or of the work that makes
    the volumes it reads, is pending (or what is pending waits for a fix)."""
    if not _blocked_or_done(image):
        return blocker(image, view) is not None  # waits on work that waits for a fix
    for volume in image.chain:
        producer = view.producer_of(volume)
        if producer is not None and not _blocked_or_done(producer):
            return False
    return True


def _blocked_or_done(image: Image) -> bool:
    """No stage to wait for: none left, one waiting for a fix, or one that waits for the
    image's detach (a kind with no live form, on an attached image: docs/adr/0028)."""
    op = image.current_operation()
    if op is None or op.state in (ops.FAILED, ops.STOPPED, ops.HELD):
        return True
    stage = op.current_stage
    return image.attached_on is not None and stage is not None and not has_live_form(stage)
