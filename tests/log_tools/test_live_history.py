"""``strata-log history`` on a log of live work (docs/adr/0028): each new event as a sentence,
and the host an image is attached on among what changed."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import Mapper, StoredEvent

from engine.log import OperationLog
from engine.persistence.transcoder import default_transcoder
from engine.projections.log_events import new_mapper, to_event
from engine.projections.point_in_time import Until, replay
from tests.log_tools.cli import strata_log
from tests.log_tools.live_log import LiveLog, make_live_log
from tests.replay.test_point_in_time_replay import folded

LIVE_EVENTS = {
    "ImageAttached", "AttachmentReleased", "OperationRequested", "StageReached", "OperationAborted"
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="qemu-storage-daemon is not installed (Debian: qemu-system-common)",
)


@pytest.fixture(scope="module")
def live_log(tmp_path_factory: pytest.TempPathFactory) -> LiveLog:
    return make_live_log(str(tmp_path_factory.mktemp("live")))


@pytest.fixture(scope="module")
def lines(live_log: LiveLog) -> list[str]:
    done = strata_log("history", live_log.repo, live_log.disk)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def event_lines(lines: list[str], event: str) -> list[str]:
    """The lines of ``event``, from the sentence on."""
    return [line.split(f"  {event}  ", 1)[1] for line in lines if f"  {event}  " in line]


def test_attach_and_tear_down_are_said_with_the_host(lines: list[str]) -> None:
    assert event_lines(lines, "ImageAttached") == [
        "attached on host-a: its storage daemon serves the image",
        "attached on host-c: its storage daemon serves the image",
    ]
    assert event_lines(lines, "ImageTornDown") == [
        "torn down on host-a: no longer prepared or attached there"
    ]
    assert "          attached_on: None -> 'host-a'" in lines
    assert "          attached_on: 'host-a' -> None" in lines


def test_a_requested_block_job_says_what_it_writes_where(lines: list[str]) -> None:
    commit, pull, aborted, pivoting = event_lines(lines, "OperationRequested")
    assert commit.startswith("block job commit ") and " requested: commit " in commit
    assert ", then " in commit and " reads " in commit  # an intermediate commit: its child
    assert pull.startswith("block job pull ") and "pull the volumes below " in pull
    assert ", down to " in pull  # a partial pull
    for active in (aborted, pivoting):
        assert active.endswith(", then the image pivots onto it")
    assert "{" not in commit + pull  # not the plan's dict


def test_a_reached_phase_an_abort_and_a_released_attachment_are_sentences(
    live_log: LiveLog, lines: list[str]
) -> None:
    (reached,) = event_lines(lines, "StageReached")
    assert reached.startswith(f"stage 1 of operation {live_log.pivoting} reached 'pivoting'")
    (aborted,) = event_lines(lines, "OperationAborted")
    assert aborted.startswith(f"operation {live_log.aborted}")
    assert aborted.endswith("aborted, the chain left as it was: abort_block_job")
    (released,) = event_lines(lines, "AttachmentReleased")
    assert released == (
        "attachment of host-c released: host host-c is dead (its heartbeat expired), its daemon too"
    )
    at = lines.index(next(line for line in lines if "  AttachmentReleased  " in line))
    assert "  host-d  " in lines[at] and lines[at + 1] == "          attached_on: 'host-c' -> None"


def test_the_json_keeps_the_fields_as_the_log_has_them(live_log: LiveLog) -> None:
    done = strata_log("history", live_log.repo, live_log.disk, "--json")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    by_event = {e["event"]: e for e in entries}  # the last of each
    assert by_event["StageReached"]["fields"]["phase"] == "pivoting"
    assert by_event["OperationAborted"]["fields"]["reason"] == "abort_block_job"
    assert by_event["AttachmentReleased"]["fields"]["of_host"] == "host-c"
    plan = by_event["OperationRequested"]["fields"]["operation"]
    assert (plan["op_id"], plan["purpose"]) == (live_log.pivoting, "commit")
    assert plan["stages"][0]["do"] == "commit"
    assert by_event["ImageAttached"]["changed"]["attached_on"] == [None, "host-c"]


def test_the_live_log_folds_the_same_with_or_without_the_overwritten_records(
    live_log: LiveLog,
) -> None:
    """Replay leaves out claims and progress that later records overwrite; a StageReached
    between a claim and its completion must keep its phase all the same."""
    log_dir = str(Path(live_log.repo) / "log")
    end = replay(log_dir, skip_superseded=False)
    for position in range(1, end.position + 1):
        assert folded(replay(log_dir, Until(seq=position))) == folded(
            replay(log_dir, Until(seq=position), skip_superseded=False)
        )
    image = end.view.image(uuid.UUID(live_log.disk))
    assert image is not None and image.attached_on is None
    op = image.operation(live_log.pivoting)
    assert op is not None and (op.phase, op.claim_host) == ("pivoting", "host-c")
    (aborted,) = [o for o in image.operations if o.op_id.startswith(live_log.aborted)]
    assert aborted.aborted and aborted.finished


def test_replay_decodes_the_live_events_as_the_library_does(live_log: LiveLog) -> None:
    library: Mapper[Any] = Mapper(default_transcoder())
    mine = new_mapper()
    with OperationLog.open(str(Path(live_log.repo) / "log"), "reader") as log:
        records = [r for r in log.read() if str(r.originator_id) == live_log.disk]
    topics = {r.topic.rsplit(".", 1)[1] for r in records}
    assert topics >= LIVE_EVENTS
    for record in records:
        stored = StoredEvent(
            record.originator_id, record.originator_version, record.topic, record.state
        )
        expected = library.to_domain_event(stored)
        decoded = to_event(mine, record)
        assert type(decoded) is type(expected) and vars(decoded) == vars(expected)
