"""The deep check's stage (``verify``): read every volume it names and say what is damaged.

Volumes are taken base first (docs/adr/0033). A qcow2 volume's structure is checked with
``qemu-img check`` (every table read, no data); leaked clusters waste space but lose nothing,
and are only logged. A volume another process writes (QEMU's lock refused: a running virtual
machine's top, a merge rewriting it) is passed over: what it holds is changing, so nothing
read now would be evidence, and the fast check already looks at its header. A missing file is
passed over too: the ordinary check reports it, and a clean may have freed it since the plan.

Nothing is written. What is found is handed to the executor (``run.found``), which records it
with the stage's completion, in one transaction (``DamageFound`` on each volume's owner): a
check that is stopped or dies records nothing, and a new one starts over. Progress is reported
by the bytes read, and ``run.cancel`` (a stop, or the host stopping) ends the stage within a
block.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.formats``; the
standard library.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from engine.aggregates.stage_kinds import VerifyStage
from engine.errors import ForeignFile, InvalidParameter, QemuCancelled, QemuError
from engine.executors.stage_run import Damage, StageRun, Volume, field, local
from engine.formats.qemu.digests import DigestCancelled, VolumeDigest, verify_image

logger = logging.getLogger("engine.executors")
# What reading a volume's tables costs next to reading its data, for the progress: little.
_CHECK_WEIGHT = 1 << 20


@dataclass(frozen=True, slots=True)
class _Volume:
    volume: Volume
    owner: uuid.UUID
    digest: VolumeDigest | None  # as its owner recorded it
    # The recorded digest of its backing, verified by this stage just before: only the chunks
    # the volume itself allocates are then read (docs/adr/0031).
    backing: VolumeDigest | None


def verify(run: StageRun, stage: VerifyStage) -> None:
    """Check each volume of ``stage["volumes"]``; append what is damaged to ``run.found``."""
    volumes = _volumes(run, stage)
    total = sum(_weight(v) for v in volumes) or 1
    done = 0
    for each in volumes:
        if run.cancel is not None and run.cancel.is_set():
            raise run.cancelled("this host cancelled it")
        weight = _weight(each)
        found = _verify_one(run, each, _scaled(run, done, weight, total))
        if found is not None:
            run.found.append(found)
        done += weight
        _report(run, 100.0 * done / total)


def _volumes(run: StageRun, stage: VerifyStage) -> list[_Volume]:
    refs = field(stage, "volumes")
    owners = field(stage, "owners")
    if not isinstance(refs, list) or not isinstance(owners, dict):
        raise InvalidParameter(
            f"a 'verify' stage names volumes (a list) and owners (a dict), not {stage!r}",
            name="stage",
        )
    out: list[_Volume] = []
    digests: dict[str, VolumeDigest] = {}
    for ref in refs:
        try:
            owner = uuid.UUID(str(owners[ref]))
        except (KeyError, ValueError):
            raise InvalidParameter(
                f"volume {ref!r} has no owner: {owners!r}", name="stage"
            ) from None
        image = run.local_image(owner)
        digest = None
        backing = None
        if image is not None:
            digest = VolumeDigest.from_record(image.digests.get(ref))
            if ref in image.chain and image.chain.index(ref) > 0:
                # Verified before this one (the stage lists volumes base first), if it has one.
                backing = digests.get(image.chain[image.chain.index(ref) - 1])
        if digest is not None:
            digests[ref] = digest
        out.append(_Volume(local(run, ref), owner, digest, backing))
    return out


def _weight(each: _Volume) -> int:
    """The bytes the volume costs to check: its tables (a little), and the data compared
    with its digest (only what it allocates itself when its backing's digest is known)."""
    try:
        allocated = os.stat(each.volume.path).st_blocks * 512
    except FileNotFoundError:
        return 0
    if each.digest is None:
        return _CHECK_WEIGHT
    return _CHECK_WEIGHT + (allocated if each.backing is not None else each.digest.size)


def _verify_one(run: StageRun, each: _Volume, progress: Callable[[float], None]) -> Damage | None:
    volume = each.volume
    try:
        run.storage.check_own_file(volume.path)
    except ForeignFile as e:
        _passed_over(run, volume, e.message)
        return None
    if not os.path.exists(volume.path):
        _passed_over(run, volume, "its file is missing (the ordinary check reports it)")
        return None
    problems: list[str] = []
    if volume.fmt == "qcow2":
        structure = _structure(run, volume)
        if structure is _IN_USE:
            return None
        if structure is not None:
            problems.append(structure)
    ranges: list[tuple[int, int]] = []
    if each.digest is not None:
        try:
            ranges = verify_image(
                volume.path,
                volume.fmt,
                each.digest,
                progress=progress,
                cancel=run.cancel,
                backing=each.backing,
            )
        except DigestCancelled:
            raise run.cancelled("this host cancelled it") from None
        except QemuError as e:
            if e.locked:
                _passed_over(run, volume, "another process writes it")
                return None
            problems.append(f"its data could not be read: {e.stderr.strip() or e.message}")
        if ranges:
            problems.append("data differs from its recorded digest")
    progress(100.0)
    if not problems:
        return None
    return Damage(each.owner, volume.ref, [[a, b] for a, b in ranges], "; ".join(problems))


_IN_USE = "in use"


def _structure(run: StageRun, volume: Volume) -> str | None:
    """What ``qemu-img check`` says is wrong with the volume's tables; None if nothing,
    ``_IN_USE`` if another process writes it."""
    try:
        result = run.qemu.check(volume.path, fmt=volume.fmt, cancel=run.cancel)
    except QemuCancelled:
        raise run.cancelled("this host cancelled it") from None
    except QemuError as e:
        if e.locked:
            _passed_over(run, volume, "another process writes it")
            return _IN_USE
        return f"qemu-img check could not read it: {e.stderr.strip() or e.message}"
    if result.leaks:
        logger.info(
            "volume %s has %d leaked cluster(s): space wasted, no data lost",
            volume.path, result.leaks, extra=_context(run, volume),
        )  # fmt: skip
    if result.corruptions or result.check_errors:
        said = [f"{result.corruptions} corruption(s)"] if result.corruptions else []
        if result.check_errors:
            said.append(f"{result.check_errors} error(s) while checking")
        return f"qemu-img check found {' and '.join(said)} in its tables"
    return None


def _scaled(run: StageRun, done: int, weight: int, total: int) -> Callable[[float], None]:
    """A volume's own progress (0..100) as the stage's."""

    def progress(percent: float) -> None:
        _report(run, 100.0 * (done + weight * min(100.0, percent) / 100.0) / total)

    return progress


def _report(run: StageRun, percent: float) -> None:
    if run.progress is not None:
        run.progress(percent)


def _passed_over(run: StageRun, volume: Volume, why: str) -> None:
    logger.info(
        "deep check: volume %s passed over: %s", volume.path, why, extra=_context(run, volume)
    )


def _context(run: StageRun, volume: Volume) -> dict[str, object]:
    return {
        "image": str(run.image_id),
        "operation": run.op_id,
        "stage": run.index + 1,
        "path": volume.path,
    }
