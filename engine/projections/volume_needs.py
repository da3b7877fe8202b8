"""Who needs which volume: the index the fix rules (engine/projections/check.py) decide from.

Built in one pass over every image. A volume is *needed* while a live chain holds it, an
unfinished stage that will still run mentions it (produces it, reads it, or reads the chain of an
image it names), or a queued ``clean`` will delete it anyway. Work on a removed image runs only
when it is a ``clean`` or a ``merge`` (the executors' rule), or when it makes a volume that work
which will run reads (:func:`needed_volumes`): data is freed only once nothing depends on it
(docs/adr/0017-nothing-stuck-without-a-reason.md).

Imports: its own package, ``engine.aggregates``; the standard library.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.operations import Operation
from engine.aggregates.stage_kinds import RebaseStage, Stage, deleted_by
from engine.aggregates.work_rules import (
    VOLUME_KEYS,
    chains_without,
    needed_volumes,
    will_run,
)
from engine.projections.folded_state import by_id
from engine.projections.status import wants_optimizing

_ATTEMPT_TAG = re.compile(r"(?P<op>.+)-(?P<stage>[0-9]+)-e(?P<epoch>[0-9]+)")  # stage_run's


class Merge(NamedTuple):
    """Volume ``volume`` of removed ``owners``, which live ``users`` still go through.

    A NamedTuple, not a frozen dataclass (a ``setattr`` per field): a check of a large
    repository makes one for every removed volume that chains go through.
    """

    volume: str
    parent: str | None
    children: tuple[str, ...]
    users: tuple[Image, ...]  # live, by id
    owners: tuple[Image, ...]  # removed images whose top it is, by id
    depth: int

    @property
    def carrier(self) -> Image:
        """The image the merge is queued on: an attached user if there is one, so that the
        host serving it claims the work and runs it live; else the first by id."""
        return next((user for user in self.users if user.attached_on), self.users[0])

    @property
    def family(self) -> str:
        """Chains that share a volume share their base: one merge at a time per base."""
        return self.users[0].chain[0]


def can_optimize(image: Image, lost: Collection[str]) -> bool:
    """Whether an optimize may be queued now: idle, unused, whole, not flat yet, and not a
    migration's replica (its files are the source's, made by the migration: ADR 0029)."""
    return (
        not image.removed
        and image.replica_of is None
        and wants_optimizing(image)
        and image.current_operation() is None
        and not image.prepared_on
        and not any(ref in lost for ref in image.chain)
    )


def _is_replica(image: Image) -> bool:
    return image.replica_of is not None and not image.removed


class VolumeIndex:
    """Built in one pass over the images in the order given, the view's: the order they lie in
    memory. Going through a large repository's images in id order instead visits memory at
    random, twice as slow; the lists of users are sorted by id once built."""

    def __init__(
        self,
        images: Iterable[Image],
        elsewhere: Collection[str] = (),
        writers: Mapping[str, Operation] | None = None,
    ) -> None:
        """``elsewhere``: volumes of this repository that work in other repositories reads.
        ``writers``: operations of other repositories whose stages write temporary files here
        (a migration's: docs/adr/0029), by id."""
        self.images = list(images)
        self.writers: Mapping[str, Operation] = writers or {}
        self.by_id = {i.id: i for i in self.images}
        self.live_users: dict[str, list[Image]] = {}  # each list by id
        self.removed_users: dict[str, list[Image]] = {}  # each list by id
        self.tops: set[str] = set()  # the top volume of each live chain: its own data
        # The top volume of each removed chain (a dict for its order: the images').
        self.removed_tops: dict[str, None] = {}
        self.pending: set[str] = set()  # made by an unfinished stage that will run
        self.mentioned: set[str] = set()  # read or made by an unfinished stage that will run
        self.queued: set[str] = set()  # to be deleted by a queued clean
        self._ops: dict[str, Operation] | None = None  # by id, made when first asked
        merges: list[tuple[Image, Operation]] = []
        replicas: list[Image] = []
        for image in self.images:
            if image.replica_of is not None and not image.removed:
                replicas.append(image)
            by_ref = self.removed_users if image.removed else self.live_users
            for ref in image.chain:
                by_ref.setdefault(ref, []).append(image)
            if image.chain:
                if image.removed:
                    self.removed_tops[image.chain[-1]] = None
                else:
                    self.tops.add(image.chain[-1])
        for users in (*self.live_users.values(), *self.removed_users.values()):
            if len(users) > 1:
                users.sort(key=by_id)
        # Volumes only migrations' replicas read: missing or partial until their sync, which
        # is expected, not damage (docs/adr/0029). Still needed: a live chain holds them.
        self.replica_only = frozenset(
            ref
            for replica in replicas
            for ref in replica.chain
            if all(_is_replica(user) for user in self.live_users[ref])
        )
        done = ops.DONE
        # Only removed images' work asks what is needed: most repositories have none unfinished.
        self.needed: Collection[str] = self.live_users
        if elsewhere or any(
            i.removed and any(op.state != done for op in i.operations) for i in self.images
        ):
            self.needed = needed_volumes(self.images, elsewhere, by_id=self.by_id)
        self.elsewhere = frozenset(elsewhere)
        for image in self.images:
            for op in image.operations:
                # Finished work, nearly all of it, passed over before calling will_run.
                if op.state != done and will_run(image, op, self.needed):
                    self._note(op)
                    if op.purpose == ops.MERGE:
                        merges.append((image, op))
        self.merging_families = {f for image, op in merges for f in self._families(image, op)}

    def _note(self, op: Operation) -> None:
        for stage in op.stages[op.done :]:
            made = ops.produced_by(stage)
            if made is not None:
                self.pending.add(made)
            deleted = deleted_by(stage)
            if deleted is not None:
                self.queued.update(deleted)
                continue
            for key in VOLUME_KEYS:
                ref = stage.get(key)
                if isinstance(ref, str):
                    self.mentioned.add(ref)
            self.mentioned.update(stage.get("set_chain") or ())
            for chain in (stage.get("chain_changes") or {}).values():
                self.mentioned.update(chain)
            source = self._image(stage.get("source_image"))
            if source is not None:
                self.mentioned.update(source.chain)

    def _image(self, image_id: object) -> Image | None:
        try:
            return self.by_id.get(uuid.UUID(str(image_id))) if image_id else None
        except ValueError:
            return None

    def _families(self, image: Image, op: Operation) -> set[str]:
        families = {image.chain[0]} if image.chain else set()
        for stage in op.stages:
            volume = stage.get("drop_volume")
            if isinstance(volume, str):
                families |= {u.chain[0] for u in self.live_users.get(volume, ())}
        return families

    # --- clean ----------------------------------------------------------------------------

    def is_needed(self, ref: str) -> bool:
        return (
            ref in self.live_users
            or ref in self.mentioned
            or ref in self.queued
            or ref in self.elsewhere
        )

    def is_leftover(self, tag: str) -> bool:
        """Whether the temporary file of attempt ``tag`` (``<op>-<stage>-e<epoch>``) is one
        that no attempt will use: its operation failed, was stopped or moved on, or another
        attempt claimed the stage since. Only the attempt that holds the claim writes its file
        (a re-run starts a new file under a new epoch, ADR 0003)."""
        match = _ATTEMPT_TAG.fullmatch(tag)
        if match is None:
            return False  # not a stage's: not ours to judge
        if self._ops is None:
            self._ops = {op.op_id: op for i in self.images for op in i.operations}
        op = self._ops.get(match["op"]) or self.writers.get(match["op"])
        if op is None:
            # One this view does not know yet, or another repository's that is not connected
            # here (a migration's source): not ours to judge.
            return False
        return not (
            op.state == ops.PENDING
            and op.claim_host is not None
            and op.done == int(match["stage"])
            and op.claim_epoch == int(match["epoch"])
        )

    def clean_owner(self, ref: str) -> Image | None:
        """The removed image to carry the clean of ``ref``: one whose chain holds it and whose
        queue is not blocked by work waiting for a fix; None for a new carrier. Never a
        migration's discarded replica: it takes no work (docs/adr/0029)."""
        for image in self.removed_users.get(ref, ()):
            if image.replica_of is not None:
                continue
            op = image.current_operation()
            if op is None or op.state == ops.PENDING:
                return image
        return None

    # --- merge ----------------------------------------------------------------------------

    def merge_candidates(self) -> list[tuple[int, str, str]]:
        """(depth, volume, family) of each volume that may be merged (see :meth:`merge_of`):
        a removed image's top that live chains go through; the family and depth are those
        its :class:`Merge` would have."""
        # Only a removed image's top can be merged: asking about those alone skips most
        # volumes of a large repository.
        found = []
        tops = self.tops
        for ref in self.removed_tops:
            if ref in tops:
                continue
            users = self.live_users.get(ref)
            if users:
                first = users[0].chain
                found.append((first.index(ref), ref, first[0]))
        return found

    def merge_of(self, ref: str) -> Merge | None:
        """The merge of ``ref``, if it is a removed image's top that live chains go through."""
        users = self.live_users.get(ref)
        if not users or ref in self.tops:
            return None
        owners = tuple(i for i in self.removed_users.get(ref, ()) if i.chain[-1] == ref)
        if not owners:
            return None  # nobody's own data, yet no removal made it so: leave it be
        parents, children = set(), set()
        for user in users:
            at = user.chain.index(ref)
            parents.add(user.chain[at - 1] if at else None)
            children.add(user.chain[at + 1])
        if len(parents) != 1:
            return None  # chains disagree on what lies below: not ours to rewrite
        depth = users[0].chain.index(ref)
        return Merge(ref, parents.pop(), tuple(sorted(children)), tuple(users), owners, depth)

    def merge_blocker(self, merge: Merge, lost: Collection[str]) -> str | None:
        """Why the merge cannot be queued now, or None."""
        for ref in (merge.volume, *merge.children):
            if ref in lost or ref in self.pending:
                return f"volume {ref} is not in place"
        hosts = {user.attached_on for user in merge.users if user.attached_on is not None}
        if len(hosts) > 1:
            return f"the chains are attached on several hosts ({sorted(hosts)}); detach all but one"
        for user in merge.users:
            if _is_replica(user):
                return f"image {user.id} is a replica being filled by a migration"
            # An attached image is merged live by the host that serves it (docs/adr/0028); one
            # a virtual machine opens itself (prepared) cannot be.
            if user.prepared_on - {user.attached_on}:
                return f"image {user.id} is in use on {sorted(user.prepared_on)}"
            if user.current_operation() is not None:
                return f"image {user.id} has work queued; merge once it is done"
        return None

    def merge_stages(self, merge: Merge, carrier: Image) -> list[RebaseStage]:
        """Rebase each child onto the volume's parent; the last stage drops it from the chains.

        The carrier's chain changes through ``set_chain``, the other live users' through
        ``chain_changes`` (recorded with the last ``StageCompleted``); ``drop_volume`` names
        what both drop, so an executor can recompute them on the chains at completion.
        """
        stages: list[RebaseStage] = [
            {"do": "rebase", "volume": child, "backing": merge.parent, "old_backing": merge.volume}
            for child in merge.children
        ]
        changes = {i.id_text: chain for i, chain in chains_without(merge.users, merge.volume)}
        stages[-1]["set_chain"] = changes.pop(carrier.id_text)
        stages[-1]["chain_changes"] = changes
        stages[-1]["drop_volume"] = merge.volume
        return stages

    def stale_merge(self, carrier: Image, stages: list[Stage]) -> str | None:
        """Why a merge planned earlier no longer applies as planned, or None."""
        volume = stages[-1].get("drop_volume") if stages else None
        merge = None if not isinstance(volume, str) else self.merge_of(volume)
        if merge is None:
            return f"volume {volume} is no longer a removed image's volume that chains go through"
        why = self.merge_blocker(merge, ())
        if why is not None:
            return why
        if merge.family in self.merging_families:
            return "another merge runs on these chains; check again once it is done"
        planned = self.merge_stages(merge, carrier)
        if not any("old_backing" in stage for stage in stages):
            # Checked by a Strata that did not name it yet (mixed versions): the same merge.
            for stage in planned:
                del stage["old_backing"]
        if carrier.removed or planned != stages:
            return f"the chains through {volume} changed since the check"
        return None
