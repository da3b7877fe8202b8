"""Missing and damaged volumes: what an image's status and the check say about the files.

Between the log (which says what each image's chain is) and the files (which may have gone or
been damaged under it). A status query looks at its image's volumes with one ``lstat`` each: a
missing file makes the image broken at once, with a ``last_error`` naming the file. A check looks
deeper at every volume of an idle live chain (:mod:`engine.formats.qemu.volume_header`), and what it
finds damaged counts as lost until the volume is made again (docs/adr/0017).

A deep check (docs/adr/0033) reads everything: :func:`deep_check_stage` plans its ``verify``
stage over the volumes of the live chains, and what it found (``DamageFound``, in the log, so
every host knows) counts as lost for the check and makes every image reading it broken, until
the volume's owner makes it again (the view's ``damaged()``, read by the fix rules).

Imports: ``engine.aggregates``, ``engine.formats``, ``engine.projections``; the standard
library.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Collection, Iterable, Mapping

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.aggregates.stage_kinds import VerifyStage
from engine.formats.qemu.volume_header import qcow2_damage, raw_damage
from engine.formats.repository.driver import RepositoryStorage, VolumeFile
from engine.projections.folded_state import by_id
from engine.projections.status import damage_sentence
from engine.projections.view import RepositoryView

# A file as the check saw it: (inode, modification time), or None if it was missing. A volume
# made again since (a mend) is another file, and no longer counts as damaged.
FileIdentity = tuple[int, int] | None


def identities(storage: RepositoryStorage, refs: Collection[str]) -> dict[str, FileIdentity]:
    """What the check found of each lost volume's file, for :func:`volume_faults` to compare."""
    found: dict[str, FileIdentity] = {}
    for ref in refs:
        try:
            st = os.lstat(storage.volume_path(*ops.split_ref(ref)))
        except FileNotFoundError:
            found[ref] = None
        else:
            found[ref] = (st.st_ino, st.st_mtime_ns)
    return found


def volume_faults(
    storage: RepositoryStorage,
    view: RepositoryView,
    image: Image,
    damaged: Mapping[str, FileIdentity],
) -> dict[str, str] | None:
    """Each volume of the image's chain that is made but missing, or that the last check found
    damaged (``damaged``: its file then) and is still that file, with a sentence that says so;
    None when there is none."""
    faults = None
    rotten = view.damaged()
    for ref in image.chain:
        if not view.is_ready(ref):
            continue  # still to be made: not missing
        path = _path(storage, ref)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            why = f"volume {ref} is missing ({path}); check the repository for a fix"
        else:
            if ref in rotten:  # the log says so, on every host (docs/adr/0033)
                why = damage_sentence(ref, rotten[ref])
            elif ref not in damaged or damaged[ref] != (st.st_ino, st.st_mtime_ns):
                continue
            elif not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                why = (
                    f"volume {ref} is a foreign file ({path}: a link, or a file with a name "
                    "outside the repository, never read or written through); put it right by "
                    "hand, then check the repository again"
                )
            else:
                why = f"volume {ref} is damaged ({path}); check the repository for a fix"
        if faults is None:
            faults = {}
        faults[ref] = why
    return faults


@functools.lru_cache(maxsize=1 << 16)
def _path(storage: RepositoryStorage, ref: str) -> str:
    """A volume's path, remembered: checking the reference and the id costs more than the
    ``lstat`` a status query makes."""
    return storage.volume_path(*ops.split_ref(ref))


def find_damaged(
    view: RepositoryView,
    files: Iterable[VolumeFile],
    sound: dict[str, tuple[int, int, int, int]] | None = None,
) -> dict[str, str]:
    """The published volumes of live chains that are not sound, each with why. Only volumes
    that no unfinished work touches are looked at: work in progress may rightly leave a volume
    shorter than its image for a while (a resize queued). ``sound``: the qcow2 volumes found
    sound before, by the file's identity and size then; a file unchanged since is not read
    again (10,000 headers cost a check a tenth of a second), and the map is brought up to
    date."""
    published = {ops.volume_ref(f.volume_id, f.fmt): f for f in files if not f.is_temporary}
    exact: dict[str, int] = {}  # raw tops: the image's size
    largest: dict[str, int] = {}
    busy: set[str] = set()
    for image in view.live_images():
        idle = image.current_operation() is None
        for ref in image.chain:
            if not idle:
                busy.add(ref)
            largest[ref] = max(largest.get(ref, 0), image.size)
        if idle and image.chain:
            exact[image.chain[-1]] = image.size
    damaged: dict[str, str] = {}
    for ref, size in largest.items():
        f = published.get(ref)
        if f is None or ref in busy or not view.is_ready(ref):
            continue
        if f.fmt == "qcow2":
            seen = None if f.identity is None else (*f.identity, f.size)
            if sound is not None and seen is not None and sound.get(ref) == seen:
                continue
            why = qcow2_damage(f.path, f.size)
            if sound is not None and seen is not None:
                if why is None:
                    sound[ref] = seen
                else:
                    sound.pop(ref, None)
        else:
            why = raw_damage(f.size, exact.get(ref), size)
        if why is not None:
            damaged[ref] = f"volume {ref} {why}"
    if sound is not None:
        for gone in sound.keys() - published.keys():
            del sound[gone]
    return damaged


def deep_check_stage(view: RepositoryView) -> VerifyStage | None:
    """The ``verify`` stage of a deep check: every made volume of a live chain (a migration's
    replica's are still being filled), base first, each with its owner; None if there is none.

    A volume's owner is where what is found is recorded, and where a mend that makes it again
    runs (its completion clears the record): the image that recorded its digest, else the
    first live image (by id) whose top it is, else the first live image whose chain holds it.
    """
    depth: dict[str, int] = {}
    tops: dict[str, Image] = {}
    holders: dict[str, Image] = {}
    live = sorted(view.live_images(), key=by_id)
    for image in live:
        if image.replica_of is not None:
            continue
        for position, ref in enumerate(image.chain):
            if view.is_ready(ref):
                depth[ref] = min(position, depth.get(ref, position))
                holders.setdefault(ref, image)
        if image.chain:
            tops.setdefault(image.chain[-1], image)
    if not depth:
        return None
    # A removed snapshot's digest holds only while its volume stayed as it was: once nothing
    # else read it, a block job may have committed into it (docs/adr/0031). A live image's
    # record comes first; one on a removed image is passed over for a volume a commit wrote.
    committed = {
        stage.get("volume")
        for image in view.images()
        for op in image.operations
        for stage in op.stages[: op.done]
        if stage.get("do") == "commit"
    }
    digested: dict[str, Image] = {}
    for image in sorted(view.images(), key=lambda i: (i.removed, by_id(i))):
        for ref in image.digests:
            if not (image.removed and ref in committed):
                digested.setdefault(ref, image)
    volumes = sorted(depth, key=lambda ref: (depth[ref], ref))
    owners = {ref: (digested.get(ref) or tops.get(ref) or holders[ref]).id_text for ref in volumes}
    return {"do": "verify", "volumes": volumes, "owners": owners}
