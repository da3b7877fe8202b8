"""Progress of a running stage reaches the log throttled, and a stop reaches the stage."""

from __future__ import annotations

import uuid

import pytest

from engine.errors import StageCancelled
from engine.executors.progress import Claim, StageProgress
from tests.executors.executor_repos import MiB, Repo, new_volume


def claimed(repo: Repo) -> Claim:
    ref = new_volume("qcow2")
    image = repo.request({"do": "create", "volume": ref, "size": MiB}, chain=[ref])
    op = repo.service.get(image).operations[0]
    epoch = repo.service.update(
        image, lambda i: i.claim(op_id=op.op_id, stage=0, host_id="host-a", now=i.modified_on)
    )
    return Claim(repo.service, "host-a", image, op.op_id, 0, epoch, op.stages[0])


def test_progress_is_saved_at_most_once_an_interval_and_only_when_the_percent_moved(
    repo: Repo,
) -> None:
    claim = claimed(repo)
    now = [0.0]
    progress = StageProgress(claim, interval=1.0, clock=lambda: now[0])

    for at, percent in [
        (0.0, 0.0),  # saved: the work has started
        (0.5, 10.0),  # too soon
        (1.2, 10.7),  # saved as 10
        (1.3, 20.0),  # too soon
        (2.5, 20.3),  # saved as 20
        (4.0, 20.9),  # still 20: nothing new to say
        (6.0, 100.0),  # StageCompleted will say it
    ]:
        now[0] = at
        progress(percent)

    assert repo.topics(claim.image_id).count("StageProgressed") == 3
    assert repo.service.get(claim.image_id).operations[0].percent == 20


def test_a_stop_recorded_by_another_host_cancels_the_stage_at_its_next_report(
    repo: Repo,
) -> None:
    claim = claimed(repo)
    progress = StageProgress(claim, interval=0.0)
    progress(5.0)
    repo.service.update(
        claim.image_id, lambda i: i.stop(reason="", host_id="host-b", now=i.modified_on)
    )

    with pytest.raises(StageCancelled, match="is not the next to run"):
        progress(6.0)

    assert claim.cancel.is_set()
    assert repo.topics(claim.image_id)[-1] == "FixStopped"


def test_an_outcome_after_the_claim_moved_on_is_refused_and_the_log_keeps_the_other_word(
    repo: Repo,
) -> None:
    claim = claimed(repo)
    repo.service.update(
        claim.image_id,
        lambda i: i.claim(op_id=claim.op_id, stage=0, host_id="host-b", now=i.modified_on),
    )

    assert claim.complete({}) is False
    assert claim.fail("too late") is False

    assert repo.topics(claim.image_id)[-1] == "StageClaimed"
    assert repo.service.get(claim.image_id).operations[0].claim_host == "host-b"


def test_completion_records_other_images_new_chains_in_the_same_transaction(repo: Repo) -> None:
    claim = claimed(repo)
    other_ref = new_volume("qcow2")
    other = repo.request(chain=[new_volume("qcow2"), other_ref])

    assert claim.complete({other: [other_ref]}) is True

    log = repo.app.operation_log.read()
    completed = next(r for r in log if r.topic.endswith("StageCompleted"))
    changed = next(r for r in log if r.topic.endswith("ChainChanged"))
    assert uuid.UUID(str(changed.originator_id)) == other
    assert changed.seq == completed.seq + 1 and completed.txn_last is False
    assert repo.service.get(other).chain == [other_ref]
