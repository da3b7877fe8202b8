"""The log-backed recorders and factory pass eventsourcing's own recorder contract tests, against
real log directories; plus what the contract does not cover: other processes' appends. What the
engine does not use (subscriptions, tracking and process recorders) is refused, by a typed error
that says so (docs/adr/0024-eventsourcing-by-its-public-names.md)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from eventsourcing.persistence import (
    InfrastructureFactory,
    ProcessRecorder,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)

# The module, not its classes: pytest would collect an imported TestCase class as a test too.
from eventsourcing.tests import persistence as contract
from eventsourcing.utils import Environment

from engine.errors import NotSupported
from engine.log import OperationLog
from engine.persistence import (
    LogAggregateRecorder,
    LogApplicationRecorder,
    LogInfrastructureFactory,
)


class _LogDirectories:
    """Each recorder gets a fresh log in a temporary directory, closed after the test."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="strata-contract-")
        self._logs: list[OperationLog] = []
        super().setUp()  # type: ignore[misc]

    def tearDown(self) -> None:
        super().tearDown()  # type: ignore[misc]
        for log in self._logs:
            log.close()
        self._tmp.cleanup()

    def new_log(self) -> OperationLog:
        log = OperationLog.create(str(Path(self._tmp.name) / f"log{len(self._logs)}"), "host-a")
        self._logs.append(log)
        return log


class TestLogAggregateRecorder(_LogDirectories, contract.AggregateRecorderTestCase):
    def create_recorder(self) -> LogAggregateRecorder:
        return LogAggregateRecorder(self.new_log())


class TestLogApplicationRecorder(_LogDirectories, contract.ApplicationRecorderTestCase):
    def create_recorder(self) -> LogApplicationRecorder:
        return LogApplicationRecorder(self.new_log())


class TestNonInterleavingNotificationIds(
    _LogDirectories, contract.NonInterleavingNotificationIDsBaseCase
):
    def create_recorder(self) -> LogApplicationRecorder:
        return LogApplicationRecorder(self.new_log())


class TestLogInfrastructureFactory(
    contract.InfrastructureFactoryTestCase[LogInfrastructureFactory]
):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="strata-factory-")
        self.env = Environment(
            "TestApp",
            {
                InfrastructureFactory.PERSISTENCE_MODULE: "engine.persistence",
                "STRATA_LOG_DIR": str(Path(self._tmp.name) / "log"),
                "STRATA_HOST_ID": "host-a",
                "STRATA_CREATE_LOG": "y",
            },
        )
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        self._tmp.cleanup()

    def expected_factory_class(self) -> type[LogInfrastructureFactory]:
        return LogInfrastructureFactory

    def expected_aggregate_recorder_class(self) -> type[LogAggregateRecorder]:
        return LogAggregateRecorder

    def expected_application_recorder_class(self) -> type[LogApplicationRecorder]:
        return LogApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        raise AssertionError("the log has no tracking recorder; see test_create_tracking_recorder")

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        raise AssertionError("the log has no tracking recorder; see test_create_tracking_recorder")

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        raise AssertionError("the log has no process recorder; see test_create_process_recorder")

    def test_create_tracking_recorder(self) -> None:
        """The base test expects a TrackingRecorder. The engine's read models keep their log
        position in their own database, written in one transaction with their rows, so none
        is made (with or without a class or topic named)."""
        self.factory.env[self.factory.TRACKING_RECORDER_TOPIC] = (
            "eventsourcing.popo:POPOTrackingRecorder"
        )
        for named in (None, TrackingRecorder):
            with pytest.raises(NotSupported) as refused:
                self.factory.tracking_recorder(named)
            assert refused.value.code == "not_supported"
            assert "read model" in refused.value.message

    def test_create_process_recorder(self) -> None:
        """The base test expects a ProcessRecorder. Ours refuses, by design: a process
        application must commit its tracking position atomically with its events, and the
        shared log records no tracking (positions are host-local). Check the refusal is the
        typed error that says so, every time it is asked."""
        for _ in range(2):
            with pytest.raises(NotSupported) as refused:
                self.factory.process_recorder()
            assert refused.value.code == "not_supported"
            assert "tracking" in refused.value.message


APPEND_FROM_ANOTHER_PROCESS = """
import sys, uuid
from engine.log import NewEvent, OperationLog
log = OperationLog.open(sys.argv[1], "host-b")
log.append([NewEvent(uuid.UUID(sys.argv[2]), 1, "from-b", b"state from b")])
log.close()
"""


def _append_in_another_process(directory: str, originator_id: uuid.UUID) -> None:
    subprocess.run(
        [sys.executable, "-c", APPEND_FROM_ANOTHER_PROCESS, directory, str(originator_id)],
        check=True,
        timeout=60,
    )


def test_another_process_appends_are_seen_by_reads_and_by_the_max_notification_id(
    tmp_path: Path,
) -> None:
    log = OperationLog.create(str(tmp_path / "log"), "host-a")
    recorder = LogApplicationRecorder(log)
    originator_id = uuid.uuid4()
    _append_in_another_process(log.directory, originator_id)
    assert recorder.max_notification_id() == 1
    assert recorder.select_events(originator_id) == [
        StoredEvent(originator_id, 1, "from-b", b"state from b")
    ]
    log.close()


def test_a_subscription_is_refused_rather_than_never_delivering(tmp_path: Path) -> None:
    log = OperationLog.create(str(tmp_path / "log"), "host-a")
    with pytest.raises(NotSupported) as refused:
        LogApplicationRecorder(log).subscribe(gt=None)
    assert "follows the log itself" in refused.value.message
    log.close()


def test_a_topic_filter_spans_many_unmatched_records_and_keeps_the_limit(tmp_path: Path) -> None:
    log = OperationLog.create(str(tmp_path / "log"), "host-a")
    recorder = LogApplicationRecorder(log)
    rare = uuid.uuid4()
    events = [StoredEvent(uuid.uuid4(), 1, "common", b"") for _ in range(3000)]
    events[1500] = StoredEvent(rare, 1, "rare", b"1")
    events[2999] = StoredEvent(rare, 2, "rare", b"2")
    recorder.insert_events(events)
    assert [n.id for n in recorder.select_notifications(None, 10, topics=["rare"])] == [1501, 3000]
    assert [n.id for n in recorder.select_notifications(None, 1, topics=["rare"])] == [1501]
    assert (
        recorder.select_notifications(1501, 5, stop=2999, topics=["rare"], inclusive_of_start=False)
        == []
    )
    log.close()


def test_recording_tracking_with_events_is_refused_rather_than_dropped(tmp_path: Path) -> None:
    log = OperationLog.create(str(tmp_path / "log"), "host-a")
    recorder = LogApplicationRecorder(log)
    with pytest.raises(NotSupported):
        recorder.insert_events(
            [StoredEvent(uuid.uuid4(), 1, "t", b"")],
            tracking=Tracking("upstream", 1),
        )
    assert recorder.max_notification_id() is None
    log.close()
