"""An eventsourcing application saves aggregates into the operation log and rebuilds them, in
this process or a fresh one, with every event named by an explicit, stable topic."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.application import Application
from eventsourcing.domain import ProgrammingError
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

from engine.aggregates.base import Aggregate
from engine.aggregates.repository import REPOSITORY_ID, Repository
from engine.application import LIBRARY_SAVE_STEPS, LogConfig, StrataLogApplication
from engine.errors import InvalidParameter, NotSupported
from engine.log import OperationLog

CREATED_AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _format(app: StrataLogApplication) -> Repository:
    return app.create_repository(format_name="localfs", format_version="1.0", created_at=CREATED_AT)


@pytest.fixture
def config(tmp_path: Path) -> LogConfig:
    return LogConfig(log_dir=str(tmp_path / "log"), host_id="host-a", create=True)


def test_a_created_repository_is_rebuilt_from_the_log(config: LogConfig) -> None:
    with StrataLogApplication(config) as app:
        _format(app)
    with StrataLogApplication(config) as reopened:
        repository = reopened.get_repository()
    assert (repository.id, repository.version) == (REPOSITORY_ID, 1)
    assert (repository.format_name, repository.format_version) == ("localfs", "1.0")
    assert (repository.created_by, repository.created_on) == ("host-a", CREATED_AT)


def test_the_log_record_names_the_event_by_its_stable_topic_and_the_host(
    config: LogConfig,
) -> None:
    with StrataLogApplication(config) as app:
        _format(app)
    with OperationLog.open(config.log_dir, "auditor") as log:
        [record] = log.read()
    assert record.topic == "strata.repository.Repository.Created"
    assert record.host_id == "host-a"
    assert record.originator_id == REPOSITORY_ID


REPLAY_IN_A_FRESH_PROCESS = """
import json, sys
from engine.application import LogConfig, StrataLogApplication
with StrataLogApplication(LogConfig(log_dir=sys.argv[1], host_id="host-b")) as app:
    r = app.get_repository()
    print(json.dumps([r.format_name, r.created_by, r.created_on.isoformat(), r.version]))
"""


def test_another_process_that_never_wrote_an_event_rebuilds_the_repository(
    config: LogConfig,
) -> None:
    with StrataLogApplication(config) as app:
        _format(app)
    out = subprocess.run(
        [sys.executable, "-c", REPLAY_IN_A_FRESH_PROCESS, config.log_dir],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert json.loads(out) == ["localfs", "host-a", CREATED_AT.isoformat(), 1]


def test_formatting_a_repository_twice_is_refused_and_the_log_keeps_the_first(
    config: LogConfig, tmp_path: Path
) -> None:
    with StrataLogApplication(config) as first:
        _format(first)
    other_host = LogConfig(log_dir=config.log_dir, host_id="host-b")
    with StrataLogApplication(other_host) as second, pytest.raises(IntegrityError):
        _format(second)
    with StrataLogApplication(other_host) as reader:
        assert reader.get_repository().created_by == "host-a"
        assert reader.recorder.max_notification_id() == 1


def test_two_applications_of_one_host_share_one_open_log_until_the_last_closes(
    config: LogConfig,
) -> None:
    first = StrataLogApplication(config)
    second = StrataLogApplication(config)
    assert first.operation_log is second.operation_log
    _format(first)
    assert second.get_repository().created_by == "host-a"
    first.close()
    assert second.get_repository().version == 1  # still open for the second
    log = second.operation_log
    second.close()
    with pytest.raises(Exception, match="closed"):
        log.read()


def test_an_application_without_a_log_directory_is_refused_with_a_typed_error() -> None:
    class Bare(Application[str]):
        pass

    with pytest.raises(InvalidParameter, match="STRATA_LOG_DIR"):
        Bare(env={"PERSISTENCE_MODULE": "engine.persistence", "STRATA_HOST_ID": "host-a"})


def test_opening_a_missing_log_without_create_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a Strata log"):
        StrataLogApplication(LogConfig(log_dir=str(tmp_path / "nothing"), host_id="host-a"))


def test_snapshotting_is_refused_rather_than_silently_skipped(config: LogConfig) -> None:
    class Snapshotting(StrataLogApplication):
        is_snapshotting_enabled = True

    with pytest.raises(NotSupported, match="snapshots"):
        Snapshotting(config)


# --- stable topics ---------------------------------------------------------------------------


def _domain_classes() -> Iterator[type]:
    """Every class defined in a module under engine.aggregates, nested ones included."""
    package = importlib.import_module("engine.aggregates")
    for info in pkgutil.walk_packages(package.__path__, "engine.aggregates."):
        module = importlib.import_module(info.name)
        todo = [v for v in vars(module).values() if isinstance(v, type)]
        while todo:
            cls = todo.pop()
            if cls.__module__ != module.__name__:
                continue  # imported, not defined here
            yield cls
            todo.extend(v for v in vars(cls).values() if isinstance(v, type))


def _is_event_or_aggregate(cls: type) -> bool:
    if cls is Aggregate:  # the shared plumbing: never stored, so it has no topic
        return False
    names = {name for klass in cls.__mro__ for name in getattr(klass, "__annotations__", {})}
    return "originator_version" in names or hasattr(cls, "collect_events")


def test_every_event_and_aggregate_class_has_its_own_topic_that_resolves_to_it_in_a_new_process(
    tmp_path: Path,
) -> None:
    classes = [c for c in _domain_classes() if _is_event_or_aggregate(c)]
    assert Repository in classes and Repository.Created in classes
    for cls in classes:
        assert "TOPIC" in vars(cls), f"{cls.__qualname__} has no TOPIC of its own"
        assert cls.TOPIC.startswith("strata."), cls.TOPIC  # type: ignore[attr-defined]
        assert "engine" not in cls.TOPIC, f"{cls.TOPIC} names a module path"  # type: ignore[attr-defined]
        # eventsourcing's get_topic honours TOPIC (docs/adr/0024): what a save stores.
        assert get_topic(cls) == cls.TOPIC  # type: ignore[attr-defined]
    expected = {c.TOPIC: f"{c.__module__}.{c.__qualname__}" for c in classes}  # type: ignore[attr-defined]
    script = (
        "import json, sys\n"
        "from eventsourcing.utils import resolve_topic\n"
        "from engine.aggregates.topics import register_topics\n"
        "register_topics()\n"
        "found = {t: resolve_topic(t) for t in json.loads(sys.argv[1])}\n"
        "print(json.dumps({t: f'{c.__module__}.{c.__qualname__}' for t, c in found.items()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sorted(expected))],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert json.loads(out) == expected


def test_a_class_that_does_not_state_its_own_topic_is_refused_when_defined() -> None:
    with pytest.raises(ProgrammingError, match="must state its own TOPIC"):

        @dataclass(frozen=True, kw_only=True)
        class Renamed(Repository.Created):  # inherits Created's topic: would be stored as Created
            pass


def test_a_save_returns_and_records_what_the_librarys_own_save_does(tmp_path: Path) -> None:
    """StrataLogApplication.save runs the library's steps by its public names (save_collected):
    the same recordings, records and errors as the library's own ``Application.save``, which
    runs its private steps (docs/adr/0024)."""

    def saved(directory: str, save: str) -> tuple[object, object, object]:
        config = LogConfig(log_dir=str(tmp_path / directory), host_id="host-a", create=True)
        with StrataLogApplication(config) as app:

            def library_save(*objs: Any) -> object:
                return Application.save(app, *objs)

            save_with: Callable[..., object] = app.save if save == "ours" else library_save
            repository = Repository.create(
                format_name="localfs", format_version="1.0", host_id="h", created_at=CREATED_AT
            )
            recordings = save_with(repository, None)
            empty = save_with()
            stale = Repository.create(
                format_name="localfs", format_version="1.0", host_id="h", created_at=CREATED_AT
            )
            with pytest.raises(IntegrityError) as refused:
                save_with(stale)
            records = [
                (r.seq, r.originator_key, r.originator_version, r.topic, r.state)
                for r in app.operation_log.read(1, None, 10)
            ]
        return recordings, empty, (records, str(refused.value))

    assert saved("a", "ours") == saved("b", "library")


def test_the_librarys_save_still_has_the_private_steps_ours_does_by_public_names() -> None:
    """What breaks when eventsourcing changes the internals save_collected stands in for:
    ``Application.save`` must still run exactly these steps, each with the signature and the
    public calls that save_collected repeats. If this fails, read the library's new save and
    bring save_collected (and LIBRARY_SAVE_STEPS) in line (docs/adr/0024)."""
    source = inspect.getsource(Application.save)
    steps = re.findall(r"self\.(\w+)\(", source)
    assert steps == [*LIBRARY_SAVE_STEPS, "notify"]
    assert "processing_event.collect_events(*objs, **kwargs)" in source
    for name, parameter in [
        ("_record", "processing_event"),
        ("_take_snapshots", "processing_event"),
        ("_notify", "recordings"),
    ]:
        method = getattr(Application, name)
        assert list(inspect.signature(method).parameters) == ["self", parameter], name
    record = inspect.getsource(Application._record)
    assert "self.events.put(" in record and "tracking=processing_event.tracking" in record
    assert "if self.repository.cache and not self.repository.fastforward:" in record
    assert "self.repository.cache.put(aggregate_id, aggregate)" in record
    snapshots = inspect.getsource(Application._take_snapshots)
    assert "if self.snapshots and self.snapshotting_intervals:" in snapshots
    notify = inspect.getsource(Application._notify)
    assert notify.rstrip().endswith('"""'), "the library's _notify is no longer a no-op"


@pytest.mark.parametrize("step", LIBRARY_SAVE_STEPS)
def test_an_application_that_overrides_a_step_our_save_does_not_call_is_refused(
    step: str,
) -> None:
    with pytest.raises(ProgrammingError, match=step):
        type("Overriding", (StrataLogApplication,), {step: lambda self, *args: None})


def test_an_application_that_overrides_the_public_hook_still_gets_it_called(
    config: LogConfig,
) -> None:
    notified: list[object] = []

    class Notifying(StrataLogApplication):
        def notify(self, new_events: list[Any]) -> None:
            notified.extend(new_events)

    with Notifying(config) as app:
        repository = Repository.create(
            format_name="localfs", format_version="1.0", host_id="h", created_at=CREATED_AT
        )
        recordings = app.save(repository)
    assert notified == [r.domain_event for r in recordings] and len(recordings) == 1


def test_a_plain_save_puts_the_aggregate_in_the_repository_cache(
    config: LogConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGGREGATE_CACHE_MAXSIZE", "10")
    monkeypatch.setenv("AGGREGATE_CACHE_FASTFORWARD", "n")  # else the library puts nothing
    with StrataLogApplication(config) as app:
        repository = _format(app)
        assert app.repository.cache is not None
        assert app.repository.cache.get(REPOSITORY_ID) is repository
