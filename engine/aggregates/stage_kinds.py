"""The kinds of stage: each one's typed form, and which volumes it makes, works on and reads.

A stage is stored as a plain map whose ``"do"`` names its kind (the log format does not change,
docs/adr/0004-images-volumes-operations-and-stages.md). In memory the same map is typed by its
kind's ``TypedDict`` below, which costs nothing at runtime: a replay folds the maps the log gives,
never converting them (docs/adr/0021-typed-stages-and-enums.md). ``Stage`` is the union of the
kinds; a check ``stage["do"] == "create"`` narrows it to :class:`CreateStage`.

Keys are only ever added to a kind, so a log written by an older Strata keeps its meaning; a key
that an older Strata did not write is ``NotRequired``. Every kind may carry what its completion
does to chains (:class:`Completion`).

A stage runs live, through the host's storage daemon, when the image whose volumes it changes is
attached on the host that runs it, and offline through qemu-img otherwise; the kind is the same
(docs/adr/0028-live-operations-as-stages.md): ``create`` of an attached disk's new top is a live
snapshot, ``rebase`` a ``block-stream``, ``commit`` a ``block-commit``.

To add a kind of stage:

1. a member of :class:`StageKind`;
2. its ``TypedDict`` here (``do: Literal["<kind>"]`` and its keys), added to ``Stage``;
3. its case in :func:`_declare`: the volumes it makes, works on in place and reads, and whether
   it reads the chain of an image or deletes volumes; the rules of what work is needed and
   ready (engine/aggregates/work_rules.py, the executors, the fixes) follow from it;
4. its executor in engine/executors/stages.py, a branch of ``execute``;
5. the planning that makes it (engine/planning.py, or a fix of engine/projections/check.py).

mypy fails at ``assert_never`` in :func:`_declare` until 3 is done and at ``execute``'s
``_no_executor`` until 4 is; tests/aggregates/test_stage_kinds.py fails until 1 and 2 agree and
every key a declaration names is a key of its kind's form.

Imports: the standard library only.
"""

# No ``from __future__ import annotations`` here: the forms' ``NotRequired`` keys must be known
# at runtime (``__required_keys__``), which Python 3.11 cannot tell from annotations as strings.
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NotRequired, TypedDict, assert_never


class StageKind(StrEnum):
    """The ``"do"`` of a stage: the data work an executor performs."""

    CREATE = "create"  # make ``volume`` (``size``; a qcow2 overlay on ``backing`` if given)
    COPY = "copy"  # copy image ``source_image``'s content (its whole chain) into new ``volume``
    DIFF = "diff"  # qcow2 ``volume``: what ``source_image`` holds that differs from ``base``
    REBASE = "rebase"  # fold ``volume``'s backing (``old_backing``) into it, onto ``backing``
    RESIZE = "resize"  # grow ``volume`` to ``size``
    DELETE = "delete"  # remove the files ``volumes`` (and ``temporaries``)
    COMMIT = "commit"  # write ``top`` and what lies between it and ``volume`` down into ``volume``
    # Live storage migration (docs/adr/0029): the image's chain copied into the repository
    # at ``target`` (its root), where a replica of the image, same id, waits for it.
    CLONE = "clone"  # make the chain ``volumes`` empty in ``target`` (ids, formats, sizes, backing)
    SYNC = "sync"  # copy the immutable ``volumes`` into ``target``, checked, over their clones
    MIRROR = "mirror"  # start mirroring the top ``volume`` into its clone (live only)
    SWITCH = "switch"  # make the replica the image: the top in sync, then the replica switched
    # A deep check (docs/adr/0033): read ``volumes`` (qemu-img check, and the recorded digest
    # of each that has one), recording what is damaged on each volume's owner; changes nothing.
    VERIFY = "verify"
    DIGEST = "digest"  # record the content digest of the immutable ``volume`` (a snapshot's)


class Completion(TypedDict, total=False):
    """What a stage's completion does to chains, on any kind of stage."""

    set_chain: list[str]  # the image's chain once the stage has completed
    drop_volume: str  # a merge: drop this volume from the chain as it is at completion
    chain_changes: dict[str, list[str]]  # other images' new chains, by image id (a merge)


class CreateStage(Completion):
    do: Literal["create"]
    volume: str
    size: NotRequired[int]  # without it, the backing's size
    backing: NotRequired[str]
    preallocate: NotRequired[bool]  # raw only: reserve the blocks (``falloc``)


class CopyStage(Completion):
    do: Literal["copy"]
    source_image: str  # an image id, in any repository connected on the host
    volume: str
    preallocate: NotRequired[bool]
    # The root of the repository to read ``source_image`` from, where the same id is in
    # several (a mend from a replica, docs/adr/0034); absent: wherever it is whole.
    source_root: NotRequired[str]


class DiffStage(Completion):
    do: Literal["diff"]
    source_image: str
    base: str
    volume: str
    source_root: NotRequired[str]  # as a copy's


class RebaseStage(Completion):
    do: Literal["rebase"]
    volume: str
    backing: NotRequired[str | None]  # None or absent: no backing, all the data folded in
    old_backing: NotRequired[str]  # the backing it had when planned (ADR 0007); older logs lack it
    bandwidth: NotRequired[int]  # bytes/s a block job may use (0: unlimited)


class ResizeStage(Completion):
    do: Literal["resize"]
    volume: str
    size: int


class DeleteStage(Completion):
    do: Literal["delete"]
    volumes: list[str]
    temporaries: NotRequired[list[list[str]]]  # [volume, attempt tag] of stages' leftover files


class CommitStage(Completion):
    """``volume`` is the base that receives the data; ``child`` the volume right above ``top``
    (an intermediate commit, which points it at ``volume``), absent when ``top`` is the active
    volume (an active commit, which ends with the pivot onto ``volume``)."""

    do: Literal["commit"]
    volume: str
    top: str
    child: NotRequired[str]
    bandwidth: NotRequired[int]


class CloneStage(Completion):
    """``volumes``: ``[ref, virtual size, backing ref or None]`` base first."""

    do: Literal["clone"]
    target: str
    volumes: list[list[object]]


class SyncStage(Completion):
    do: Literal["sync"]
    target: str
    volumes: list[str]


class MirrorStage(Completion):
    do: Literal["mirror"]
    target: str
    volume: str  # the top, mirrored into the volume of the same ref in ``target``


class SwitchStage(Completion):
    """Its completion ends the replication and removes the image here: it lives in ``target``.
    ``merge``: the operation the replica then runs (the automatic snapshot merged away)."""

    do: Literal["switch"]
    target: str
    volume: str  # the top
    merge: NotRequired[list[str]]  # [base, top] of the commit the replica runs once switched


class VerifyStage(Completion):
    """``volumes``: base first, so that a volume's backing is verified before it;
    ``owners``: the image that owns each (holds its digest, or has it as its top), where what
    is found damaged is recorded with the stage's completion."""

    do: Literal["verify"]
    volumes: list[str]
    owners: dict[str, str]


class DigestStage(Completion):
    """The digest of ``volume``'s guest-visible content (read through its backing chain),
    recorded with the stage's completion (``VolumeDigested``, docs/adr/0031). ``backing``: the
    volume below, whose recorded digest, if any, stands for the chunks ``volume`` does not
    allocate. ``frozen_by``: the disk's new top whose making freezes ``volume`` (a snapshot's):
    until then a virtual machine attached to the disk may still write to ``volume``."""

    do: Literal["digest"]
    volume: str
    backing: NotRequired[str]
    frozen_by: NotRequired[str]


Stage = (
    CreateStage
    | CopyStage
    | DiffStage
    | RebaseStage
    | ResizeStage
    | DeleteStage
    | CommitStage
    | CloneStage
    | SyncStage
    | MirrorStage
    | SwitchStage
    | VerifyStage
    | DigestStage
)

# The keys of a stage that name one volume of the stage's repository.
VolumeKey = Literal[
    "volume", "backing", "old_backing", "base", "drop_volume", "top", "child", "frozen_by"
]


@dataclass(frozen=True, slots=True)
class KindRules:
    """Which volumes a kind of stage makes, works on and reads: what must be ready before it
    runs, what it produces, and what must not be freed while it is still to run."""

    form: type[Mapping[str, object]]  # its TypedDict
    makes: VolumeKey | None = None  # the volume it produces (through a temporary file)
    works_on: VolumeKey | None = None  # the volume it rewrites in place
    reads: tuple[VolumeKey, ...] = ()  # other volumes of this repository it reads
    reads_source: bool = False  # the whole chain of the image ``source_image`` names
    deletes: bool = False  # the volumes ``volumes`` names


def _declare(kind: StageKind) -> KindRules:
    match kind:
        case StageKind.CREATE:
            return KindRules(CreateStage, makes="volume", reads=("backing",))
        case StageKind.COPY:
            return KindRules(CopyStage, makes="volume", reads_source=True)
        case StageKind.DIFF:
            return KindRules(DiffStage, makes="volume", reads=("base",), reads_source=True)
        case StageKind.REBASE:
            return KindRules(RebaseStage, works_on="volume", reads=("backing", "old_backing"))
        case StageKind.RESIZE:
            return KindRules(ResizeStage, works_on="volume")
        case StageKind.DELETE:
            return KindRules(DeleteStage, deletes=True)
        case StageKind.COMMIT:
            return KindRules(CommitStage, works_on="volume", reads=("top", "child"))
        case StageKind.CLONE:
            return KindRules(CloneStage)
        case StageKind.SYNC:
            return KindRules(SyncStage)
        case StageKind.MIRROR:
            return KindRules(MirrorStage, reads=("volume",))
        case StageKind.SWITCH:
            return KindRules(SwitchStage, reads=("volume",))
        case StageKind.VERIFY:
            # It reads published volumes only, and a missing one is passed over: nothing it
            # names must wait for it, or be kept for it.
            return KindRules(VerifyStage)
        case StageKind.DIGEST:
            return KindRules(DigestStage, reads=("volume", "backing", "frozen_by"))
    assert_never(kind)  # mypy: a kind without its declaration


# Every kind this Strata knows, by its ``"do"`` (plain strings: a dict of them only is quicker
# to look the log's strings up in). A stage of another kind (a newer Strata's) is never run
# here, and makes or reads nothing that these rules know of.
RULES: Mapping[str, KindRules] = {kind.value: _declare(kind) for kind in StageKind}
# Every key that names a volume, whatever the kind: what must not be freed under a stage.
VOLUME_KEYS: tuple[VolumeKey, ...] = (
    *dict.fromkeys(
        key
        for rules in RULES.values()
        for key in (rules.makes, rules.works_on, *rules.reads)
        if key is not None
    ),
    "drop_volume",
)
_MAKES = {kind: rules.makes for kind, rules in RULES.items() if rules.makes is not None}


def is_known(stage: Stage) -> bool:
    """Whether this Strata knows the stage's kind (a newer host's stage waits for a newer host)."""
    return stage.get("do") in RULES


def produced_by(stage: Stage) -> str | None:
    """The volume a stage makes, if any."""
    key = _MAKES.get(stage["do"])
    volume = None if key is None else stage.get(key)
    return volume if isinstance(volume, str) else None


def has_live_form(stage: Stage) -> bool:
    """Whether the stage can run on an attached image, through the host's storage daemon
    (docs/adr/0028): the other kinds wait for its detach."""
    kind = stage.get("do")
    return kind in _LIVE_KINDS or (kind == "create" and bool(stage.get("backing")))


# Kinds that run while the image is attached: block jobs, a migration's stages (which write
# only into the replica's repository, or work through the daemon), and a digest, which only
# reads an immutable volume, sharing it with the daemon.
_LIVE_KINDS = frozenset(("rebase", "commit", "clone", "sync", "mirror", "switch", "digest"))


def is_migration(stage: Stage) -> bool:
    """Whether the stage is a migration's: it runs live on the image itself, attached here."""
    return stage.get("do") in ("mirror", "switch")


def bandwidth_of(stage: Stage) -> int:
    """The bytes per second a block job's stage may use; 0, no limit, when it names none."""
    value = stage.get("bandwidth")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def changed_by(stage: Stage) -> str | None:
    """The volume a stage makes or rewrites in place, if any: what a live stage works on."""
    rules = RULES.get(stage["do"])
    key = None if rules is None else (rules.makes or rules.works_on)
    volume = None if key is None else stage.get(key)
    return volume if isinstance(volume, str) else None


def deleted_by(stage: Stage) -> list[str] | None:
    """The volumes a stage deletes; None if it is not of a kind that deletes."""
    rules = RULES.get(stage["do"])
    if rules is None or not rules.deletes:
        return None
    volumes = stage.get("volumes")
    return [v for v in volumes if isinstance(v, str)] if isinstance(volumes, list) else []


def local_inputs(stage: Stage) -> list[str]:
    """The volumes of this repository that must be ready before the stage can run: the one
    it works on in place, then the others it reads."""
    rules = RULES.get(stage["do"])
    if rules is None:
        return []
    keys = rules.reads if rules.works_on is None else (rules.works_on, *rules.reads)
    return [ref for ref in (stage.get(key) for key in keys) if isinstance(ref, str)]


def other_reads(stage: Stage) -> list[str]:
    """The volumes of this repository the stage reads besides the one it makes or works on."""
    rules = RULES.get(stage["do"])
    if rules is None:
        return []
    return [ref for ref in (stage.get(key) for key in rules.reads) if isinstance(ref, str)]


def reads_source(stage: Stage) -> bool:
    """Whether the stage reads the whole chain of the image ``source_image`` names."""
    rules = RULES.get(stage["do"])
    return rules is not None and rules.reads_source
