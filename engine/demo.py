"""``python -m engine.demo``: two hosts share one repository's operation log.

In a temporary directory: host-a formats a repository and asks for a chore; host-b, in another
process, claims the chore and finishes it; host-a, still holding the chore as it first read it,
tries to claim it too and is refused by the log (optimistic concurrency across processes). Then
the log is reopened cold (which verifies the whole hash chain), checked with ``strata-log
verify``, and replayed into the final state of every aggregate.

The ``Chore`` aggregate lives here, not in engine/aggregates: it stands in for the stages that
executors will claim, and exists only for this story.
"""

from __future__ import annotations

import io
import multiprocessing
import sys
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import singledispatchmethod
from pathlib import Path

from eventsourcing.persistence import IntegrityError

from engine.aggregates.topics import StableTopic
from engine.application import LogConfig, StrataLogApplication
from engine.log import OperationLog


class Chore(StableTopic):
    """A piece of work one host asks for and any host may claim, once."""

    TOPIC = "strata.demo.Chore"

    @dataclass(frozen=True, kw_only=True)
    class Event(StableTopic):
        TOPIC = "strata.demo.Chore.Event"

        originator_id: uuid.UUID
        originator_version: int
        timestamp: datetime
        host_id: str

    @dataclass(frozen=True, kw_only=True)
    class Requested(Event):
        TOPIC = "strata.demo.Chore.Requested"
        what: str

    @dataclass(frozen=True, kw_only=True)
    class Claimed(Event):
        TOPIC = "strata.demo.Chore.Claimed"

    @dataclass(frozen=True, kw_only=True)
    class Done(Event):
        TOPIC = "strata.demo.Chore.Done"

    id: uuid.UUID
    version: int
    what: str
    requested_by: str
    claimed_by: str | None
    done: bool

    def __init__(self) -> None:
        self._pending: list[Chore.Event] = []

    @classmethod
    def request(cls, what: str, host_id: str, at: datetime) -> Chore:
        chore = cls()
        chore._record(
            cls.Requested(
                originator_id=uuid.uuid4(),
                originator_version=1,
                timestamp=at,
                host_id=host_id,
                what=what,
            )
        )
        return chore

    def claim(self, host_id: str, at: datetime) -> None:
        self._record(self._next(self.Claimed, host_id, at))

    def finish(self, host_id: str, at: datetime) -> None:
        self._record(self._next(self.Done, host_id, at))

    def _next(self, kind: type[Chore.Event], host_id: str, at: datetime) -> Chore.Event:
        return kind(
            originator_id=self.id,
            originator_version=self.version + 1,
            timestamp=at,
            host_id=host_id,
        )

    def _record(self, event: Chore.Event) -> None:
        self.apply(event)
        self._pending.append(event)

    def collect_events(self) -> list[Chore.Event]:
        events, self._pending = self._pending, []
        return events

    @singledispatchmethod
    def apply(self, event: Chore.Event) -> None:
        raise NotImplementedError(type(event).__qualname__)

    @apply.register(Requested)
    def _(self, event: Chore.Requested) -> None:
        self.id, self.what, self.requested_by = event.originator_id, event.what, event.host_id
        self.claimed_by, self.done = None, False
        self.version = event.originator_version

    @apply.register(Claimed)
    def _(self, event: Chore.Claimed) -> None:
        self.claimed_by = event.host_id
        self.version = event.originator_version

    @apply.register(Done)
    def _(self, event: Chore.Done) -> None:
        self.done = True
        self.version = event.originator_version

    @classmethod
    def project(cls, chore: Chore | None, events: Iterable[Chore.Event]) -> Chore | None:
        for event in events:
            chore = chore or cls()
            chore.apply(event)
        return chore


def _now() -> datetime:
    return datetime.now(UTC)


def _say(line: str) -> None:
    print(line, flush=True)


def host_b(log_dir: str, chore_id: uuid.UUID) -> None:
    """The second host, in its own process: claim the chore and finish it."""
    with StrataLogApplication(LogConfig(log_dir=log_dir, host_id="host-b")) as app:
        chore: Chore = app.repository.get(chore_id, projector_func=Chore.project)
        chore.claim("host-b", _now())
        app.save(chore)
        _say(f"  host-b  claimed the chore '{chore.what}' (now version {chore.version})")
        chore.finish("host-b", _now())
        app.save(chore)
        _say(f"  host-b  finished it (version {chore.version})")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        log_dir = str(Path(tmp) / "repo1" / "log")
        Path(log_dir).parent.mkdir()
        _say(f"A repository in {Path(log_dir).parent}, its operation log in log/.\n")

        _say("1. Two hosts append to the same log")
        host_a = LogConfig(log_dir=log_dir, host_id="host-a", create=True)
        with StrataLogApplication(host_a) as app:
            app.create_repository(format_name="localfs", format_version="1.0", created_at=_now())
            _say("  host-a  formatted the repository (localfs 1.0)")
            chore = Chore.request("copy the base image", "host-a", _now())
            app.save(chore)
            _say(f"  host-a  asked for a chore: '{chore.what}'")
            stale: Chore = app.repository.get(chore.id, projector_func=Chore.project)

            worker = multiprocessing.get_context("spawn").Process(
                target=host_b, args=(log_dir, chore.id)
            )
            worker.start()
            worker.join(timeout=120)
            if worker.exitcode != 0:
                _say(f"host-b failed (exit code {worker.exitcode})")
                return 1

            stale.claim("host-a", _now())
            try:
                app.save(stale)
                _say("  host-a  claimed the chore too: the log should have refused this!")
                return 1
            except IntegrityError as refused:
                _say(f"  host-a  tried to claim it with its stale copy: refused ({refused})")

        _say("\n2. Reopen the log cold (this verifies every checksum and the hash chain)")
        with OperationLog.open(log_dir, "auditor") as log:
            records = list(log.iter_records())
        _say(f"  {len(records)} records, hash chain intact:")
        for r in records:
            when = datetime.fromtimestamp(r.time_ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
            _say(f"  #{r.seq}  {when}  {r.host_id:7} {r.topic}  (v{r.originator_version})")
        verified = _strata_log_verify(log_dir)
        if verified is not None:
            _say("\n  strata-log verify says:")
            _say("".join(f"    {line}\n" for line in verified.splitlines()).rstrip())

        _say("\n3. Replay: rebuild every aggregate from the log alone")
        with StrataLogApplication(LogConfig(log_dir=log_dir, host_id="auditor")) as app:
            repository = app.get_repository()
            _say(
                f"  repository: {repository.format_name} {repository.format_version}, formatted "
                f"by {repository.created_by} at {repository.created_on:%H:%M:%S}"
            )
            final: Chore = app.repository.get(chore.id, projector_func=Chore.project)
            _say(
                f"  chore '{final.what}': asked by {final.requested_by}, claimed by "
                f"{final.claimed_by}, done={final.done}, version {final.version}"
            )
        ok = final.claimed_by == "host-b" and final.done and len(records) == 4
        _say("\nThe log holds what both hosts did, in order, and nothing the log refused.")
        return 0 if ok else 1


def _strata_log_verify(log_dir: str) -> str | None:
    """``strata-log verify``'s report, where log_tools has it; None where it does not."""
    try:
        from log_tools.verify import verify, write_text
    except ImportError:
        return None
    summary = verify(log_dir)
    if summary.damage is not None:
        raise summary.damage
    out = io.StringIO()
    write_text(summary, out)
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main())
