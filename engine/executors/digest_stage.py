"""The ``digest`` stage: the content digest of a snapshot's volume, made immutable without a copy.

A copy records the digest of what it writes while the data passes (docs/adr/0032); a snapshot
copies nothing: it freezes the disk's top, and this stage then reads it once, through its
backing chain, and hands ``(volume, digest)`` to the stage's completion, which records
``VolumeDigested`` in the same transaction as ``StageCompleted`` (docs/adr/0031).

It only reads, and only an immutable volume: ``qemu-nbd --read-only`` (a shared lock, which a
virtual machine reading the same volume as a backing, or a snapshot attached read-only, shares),
or the raw file itself. So it writes nothing other hosts read, needs no fencing check (a fenced
host's completion is refused by the log), and a re-run after a crash at any point computes the
same digest from the same bytes.

An overlay whose backing already has a recorded digest reads only the chunks it allocates
itself; the others are its backing's (``reuse``): a snapshot of a disk that changed little costs
little. Without one (a first snapshot, or its backing's digest not recorded yet) it reads all.

Only a snapshot's volume gets one this way (engine/planning.py, ``snapshot_digest``). A disk's
top frozen without a snapshot (the base of an incremental copy of a disk, or a migration's
automatic live snapshot) belongs to no snapshot, and nothing promises it stays as it is: the
first remains a disk's volume, which a block job may commit into once no other image reads it,
and the second is committed into by the replica right after the switch. A digest of either
would soon describe bytes that are gone, and a deep check would call that rot.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``; the
standard library.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from engine.aggregates.stage_kinds import DigestStage
from engine.errors import InvalidParameter
from engine.executors.stage_run import StageRun, field, local, refuse_foreign
from engine.formats.qemu.digests import DigestCancelled, VolumeDigest, digest_image


def digest(run: StageRun, stage: DigestStage) -> None:
    """Compute the digest of ``volume`` and hand it to the stage's completion."""
    keep = run.keep_digest
    if keep is None:  # nothing would record what it computes
        raise InvalidParameter(
            "a digest stage runs under a claim that keeps its digest", name="run"
        )
    volume = local(run, field(stage, "volume"))
    backing = local(run, stage["backing"]) if stage.get("backing") else None
    refuse_foreign(run, volume, *(() if backing is None else (backing,)))
    os.stat(volume.path)  # a missing volume said as such, not as a server that went away
    # Of another size (the disk grew after its backing was frozen) it is not used.
    reuse = None if backing is None else VolumeDigest.from_record(run.recorded_digest(backing.ref))
    try:
        found = digest_image(
            volume.path,
            volume.fmt,
            progress=_after_a_while(run.progress),
            cancel=run.cancel,
            reuse=reuse,
            force_share=True,
        )
    except DigestCancelled as e:
        raise run.cancelled(str(e)) from e
    keep(volume.ref, found)


# Most snapshots' digests take milliseconds: progress is worth an event only after a while.
QUIET_SECONDS = 1.0


def _after_a_while(progress: Callable[[float], None] | None) -> Callable[[float], None] | None:
    """``progress``, called only once the digest has run for ``QUIET_SECONDS``."""
    if progress is None:
        return None
    started = time.monotonic()

    def report(percent: float) -> None:
        if time.monotonic() - started >= QUIET_SECONDS:
            progress(percent)

    return report
