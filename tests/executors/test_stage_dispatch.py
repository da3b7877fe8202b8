"""Every kind of stage has its executor (engine/executors/stages.py, and a migration's in
engine/executors/migration_stages.py): ``execute`` hands a stage to the function of its kind,
typed as that kind (docs/adr/0021-typed-stages-and-enums.md)."""

from __future__ import annotations

import typing
import uuid
from collections.abc import Mapping

import pytest

from engine.aggregates.stage_kinds import RULES, Stage, StageKind
from engine.errors import InvalidParameter
from engine.executors import migration_stages, stages
from engine.executors.stage_run import StageRun

MIGRATION_KINDS = ("clone", "sync", "mirror", "switch")


def run_of(stage: Mapping[str, object]) -> StageRun:
    fake = typing.cast(typing.Any, None)  # execute only dispatches: nothing else is reached
    return StageRun(uuid.uuid4(), "op", 0, 1, typing.cast(Stage, stage), fake, fake, fake)


@pytest.mark.parametrize("kind", list(StageKind), ids=str)
def test_every_kind_of_stage_runs_with_the_executor_of_its_kind(
    kind: StageKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[str, Mapping[str, object]]] = []
    for other in StageKind:
        module = migration_stages if other.value in MIGRATION_KINDS else stages
        executor = getattr(module, other.value)  # each executor is named after its kind
        assert callable(executor)
        monkeypatch.setattr(
            module, other.value, lambda run, stage, name=other.value: ran.append((name, stage))
        )
    stage = {"do": kind.value}

    migration_stages.execute(run_of(stage))  # what the scheduler calls, with no daemon here

    assert ran == [(kind.value, stage)]
    assert kind in RULES


@pytest.mark.parametrize("kind", MIGRATION_KINDS)
def test_a_migration_stage_is_not_run_by_the_offline_executors(kind: str) -> None:
    with pytest.raises(InvalidParameter, match=r"runs through migration_stages\.execute"):
        stages.execute(run_of({"do": kind}))


def test_a_stage_of_an_unknown_kind_has_no_executor() -> None:
    with pytest.raises(InvalidParameter, match="no executor for a 'compress' stage"):
        stages.execute(run_of({"do": "compress"}))
