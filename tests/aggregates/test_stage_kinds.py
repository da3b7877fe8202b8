"""Every kind of stage is declared once, whole: its typed form, and the volumes it makes, works on
and reads (engine/aggregates/stage_kinds.py, docs/adr/0021-typed-stages-and-enums.md)."""

from __future__ import annotations

import typing
import uuid
from collections.abc import Mapping

import pytest

from engine import planning
from engine.aggregates import operations as ops
from engine.aggregates import stage_kinds
from engine.aggregates.stage_kinds import RULES, Stage, StageKind

KINDS = list(StageKind)
FORMS: list[type[Mapping[str, object]]] = list(typing.get_args(Stage))


def form_of(kind: StageKind) -> type[Mapping[str, object]]:
    return RULES[kind].form


def keys_of(form: type[Mapping[str, object]]) -> frozenset[str]:
    return frozenset(typing.get_type_hints(form))


def conforms(stage: Mapping[str, object]) -> bool:
    """Whether a stage has every key its kind's form requires, and no other."""
    form = form_of(StageKind(str(stage["do"])))
    required: frozenset[str] = form.__required_keys__  # type: ignore[attr-defined]
    return required <= stage.keys() <= keys_of(form)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_every_kind_is_declared_with_its_typed_form(kind: StageKind) -> None:
    form = form_of(kind)

    assert form in FORMS
    assert typing.get_type_hints(form)["do"] == typing.Literal[kind.value]


def test_the_stage_union_holds_one_form_per_kind_and_nothing_else() -> None:
    assert sorted(RULES) == sorted(KINDS)
    assert sorted(f.__name__ for f in FORMS) == sorted(form_of(k).__name__ for k in KINDS)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_every_volume_a_declaration_names_is_a_key_of_its_form(kind: StageKind) -> None:
    rules = RULES[kind]
    named: set[str] = {k for k in (rules.makes, rules.works_on, *rules.reads) if k is not None}
    if rules.reads_source:
        named.add("source_image")
    if rules.deletes:
        named.add("volumes")

    assert named <= keys_of(form_of(kind))


def test_the_keys_that_name_volumes_follow_from_the_declarations() -> None:
    keys = {"volume", "backing", "old_backing", "base", "drop_volume", "top", "child", "frozen_by"}
    assert set(stage_kinds.VOLUME_KEYS) == keys


def test_a_stage_says_what_it_makes_what_must_be_ready_and_what_it_deletes() -> None:
    a, b, c = (ops.volume_ref(uuid.uuid4().hex, "qcow2") for _ in range(3))
    rebase: Stage = {"do": "rebase", "volume": a, "backing": b, "old_backing": c}
    create: Stage = {"do": "create", "volume": a, "size": 512, "backing": b}
    delete: Stage = {"do": "delete", "volumes": [a, b]}

    assert stage_kinds.produced_by(create) == a
    assert stage_kinds.produced_by(rebase) is None
    assert stage_kinds.local_inputs(create) == [b]
    assert stage_kinds.local_inputs(rebase) == [a, b, c]
    assert stage_kinds.other_reads(rebase) == [b, c]
    assert stage_kinds.deleted_by(delete) == [a, b]
    assert stage_kinds.deleted_by(create) is None


def test_a_stage_of_a_kind_this_strata_does_not_know_makes_and_reads_nothing_known() -> None:
    newer: Mapping[str, object] = {"do": "compress", "volume": "x"}
    stage = typing.cast(Stage, newer)  # what a newer Strata may have written in the log

    assert not stage_kinds.is_known(stage)
    assert stage_kinds.produced_by(stage) is None
    assert stage_kinds.local_inputs(stage) == []
    assert not stage_kinds.reads_source(stage)


def test_planning_writes_every_stage_in_its_kinds_form() -> None:
    image = uuid.uuid4()
    chain = [ops.volume_ref(uuid.uuid4().hex, "qcow2")]
    plans: list[ops.OperationPlan] = []
    for strategy in ops.STRATEGIES:
        plans += planning.blank_disk(512, strategy)[1]
        plans += planning.disk_on_snapshot(512, chain, strategy, image)[1]
        plans += planning.snapshot_of_disk(image, chain, 512, strategy)[1]
        plans += planning.full_copy(image, strategy)[1]
        plans += planning.incremental_copy(image, chain, strategy, image)[1]
    plans.append(planning.resize(chain[-1], 1024))

    stages = [stage for plan in plans for stage in plan["stages"]]
    assert {stage["do"] for stage in stages} == {"create", "copy", "diff", "resize"}
    assert all(conforms(stage) for stage in stages)
    assert all(plan["purpose"] in set(ops.Purpose) for plan in plans)


def test_purposes_and_states_are_the_strings_the_log_holds() -> None:
    assert [p.value for p in ops.FIX_TYPES] == ["clean", "optimize", "merge", "mend"]
    assert ops.DONE == "done" and f"{ops.FAILED}" == "failed" and {"held": 1}[ops.HELD] == 1
    assert type(str(ops.MEND)) is str
