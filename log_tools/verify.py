"""``strata-log verify``: check a whole log without touching it, and say what it holds.

Every segment header, frame checksum, sequence number, hash-chain link and record payload is
checked by the engine's own reader code (:mod:`engine.log.reader`), and every event is decoded
by the application's mapper (upcasting included). A torn tail is sound: it is what a crash
mid-append leaves, it was never committed, and the next appender cuts it; unless a host's
witness says it committed records the log no longer holds (engine/log/witness.py): then the
log was cut, and that is damage. An event of a class
this Strata does not know (a later version wrote it) is counted, not called damage.

Imports: its own package, ``engine.errors``, ``engine.log``, ``engine.projections``,
eventsourcing; the standard library.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from eventsourcing.utils import TopicError

from engine.errors import LogCorrupted
from engine.log.framing import Record
from engine.log.reader import ReadOnlyLog, TailState, leftovers
from engine.log.witness import Witness, read_witnesses
from engine.projections.log_events import locate, new_mapper, to_event
from log_tools.render import iso_time, printable


@dataclass
class Summary:
    log_directory: str
    segments: int | None = None  # unknown when the segment files themselves do not add up
    format_version: int | None = None
    records: int = 0
    transactions: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_time_ns: int | None = None
    last_time_ns: int | None = None
    hosts: Counter[str] = field(default_factory=Counter)
    aggregates: set[object] = field(default_factory=set)
    tail: TailState | None = None
    kept_torn_tails: list[str] = field(default_factory=list)
    stale_temporaries: list[str] = field(default_factory=list)
    unknown_topics: Counter[str] = field(default_factory=Counter)
    damage: LogCorrupted | None = None

    def add(self, record: Record) -> None:
        if self.first_seq is None:
            self.first_seq, self.first_time_ns = record.seq, record.time_ns
        self.last_seq, self.last_time_ns = record.seq, record.time_ns
        self.records += 1
        self.transactions += record.txn_last
        self.hosts[record.host_id] += 1
        self.aggregates.add(record.originator_id)


def verify(log_dir: str) -> Summary:
    """Read the whole log; damage is recorded in the summary, not raised."""
    summary = Summary(log_dir)
    log = None
    # Read first: what a witness names was committed before the records are read.
    witnesses = read_witnesses(log_dir)
    next_of = {w.seq + 1: w for w in witnesses}
    try:
        log = ReadOnlyLog(log_dir)
        summary.segments = len(log.numbers)
        mapper = new_mapper()
        for record in log.records():
            witness = next_of.get(record.seq)
            if witness is not None and record.prev_hash != witness.hash:
                segment, offset = locate(log_dir, witness.seq)
                raise LogCorrupted(
                    f"host {witness.host_id!r} committed record {witness.seq} with another "
                    "chain hash: the log was replaced or rewritten",
                    segment=segment,
                    offset=offset,
                )
            try:
                to_event(mapper, record)
            except TopicError:
                summary.unknown_topics[record.topic] += 1
            except (ValueError, TypeError, KeyError) as e:
                segment, offset = locate(log_dir, record.seq)
                raise LogCorrupted(
                    f"record {record.seq} ({record.topic}) does not decode: {e}",
                    segment=segment,
                    offset=offset,
                ) from e
            summary.add(record)
        _check_cut(witnesses, summary, log)
    except LogCorrupted as e:
        summary.damage = e
    if log is not None:
        if 1 in log.headers:
            summary.format_version = log.headers[1].version
        summary.tail = log.tail
    summary.kept_torn_tails, summary.stale_temporaries = leftovers(log_dir)
    return summary


def _check_cut(witnesses: list[Witness], summary: Summary, log: ReadOnlyLog) -> None:
    """A torn tail is sound only if no host acknowledged what it held (ADR 0018)."""
    last = summary.last_seq or 0
    beyond = [w for w in witnesses if w.seq > last]
    if beyond and log.tail is not None:
        witness = max(beyond, key=lambda w: w.seq)
        raise LogCorrupted(
            f"host {witness.host_id!r} committed records up to sequence {witness.seq}, but the "
            f"log holds only {last}: the log was cut",
            segment=log.tail.segment,
            offset=log.tail.end,
        )


def to_json(summary: Summary) -> dict[str, Any]:
    tail = summary.tail
    damage = summary.damage
    return {
        "status": "damaged" if damage else "sound",
        "log_directory": summary.log_directory,
        "format_version": summary.format_version,
        "segments": summary.segments,
        "records": summary.records,
        "transactions": summary.transactions,
        "aggregates": len(summary.aggregates),
        "first_seq": summary.first_seq,
        "last_seq": summary.last_seq,
        "first_time": _maybe_time(summary.first_time_ns),
        "last_time": _maybe_time(summary.last_time_ns),
        "first_time_ns": summary.first_time_ns,
        "last_time_ns": summary.last_time_ns,
        "hosts": dict(sorted(summary.hosts.items())),
        "tail": None
        if tail is None
        else {
            "state": "torn" if tail.torn else "clean",
            "segment": tail.segment,
            "offset": tail.end,
            "torn_bytes": tail.size - tail.end,
        },
        "kept_torn_tails": summary.kept_torn_tails,
        "stale_temporaries": summary.stale_temporaries,
        "unknown_topics": dict(sorted(summary.unknown_topics.items())),
        "damage": None if damage is None else {**damage.to_dict(), "detail": damage.detail},
    }


def write_text(summary: Summary, out: TextIO) -> None:
    rows = [
        ("log", summary.log_directory),
        ("format", f"version {summary.format_version}" if summary.format_version else "unknown"),
        ("segments", "unknown" if summary.segments is None else str(summary.segments)),
        ("records", _records_row(summary)),
        ("time", _time_row(summary)),
        ("hosts", _hosts_row(summary)),
        ("tail", _tail_row(summary.tail)),
    ]
    if summary.kept_torn_tails:
        rows.append(("kept", f"{len(summary.kept_torn_tails)} cut-off torn tail(s) in torn/"))
    if summary.unknown_topics:
        count = sum(summary.unknown_topics.values())
        rows.append(
            (
                "events",
                f"{count} of {len(summary.unknown_topics)} class(es) this Strata does not know "
                "(written by a later version?); the rest decode",
            )
        )
    elif summary.records:
        rows.append(("events", "every one decodes"))
    if summary.stale_temporaries:
        names = ", ".join(map(printable, summary.stale_temporaries))
        rows.append(("leftover", f"{names} (an unfinished roll-over; not part of the log)"))
    damage = summary.damage
    if damage is None:
        rows.append(("result", "sound"))
    else:
        where = f"segment {damage.segment} at byte offset {damage.offset}"
        rows.append(("result", f"DAMAGED in {where}: {damage.detail}"))
    for name, value in rows:
        out.write(f"{name:<9} {value}\n")


def _records_row(summary: Summary) -> str:
    if summary.records == 0:
        text = "0"
    else:
        text = (
            f"{summary.records} in {summary.transactions} transaction(s) of "
            f"{len(summary.aggregates)} aggregate(s), sequence {summary.first_seq}.."
            f"{summary.last_seq}"
        )
    return text + (" (read before the damage)" if summary.damage else "")


def _time_row(summary: Summary) -> str:
    if summary.first_time_ns is None or summary.last_time_ns is None:
        return "-"
    return f"{iso_time(summary.first_time_ns)} .. {iso_time(summary.last_time_ns)}"


def _hosts_row(summary: Summary) -> str:
    if not summary.hosts:
        return "-"
    return ", ".join(
        f"{printable(host)} ({count} records)" for host, count in sorted(summary.hosts.items())
    )


def _tail_row(tail: TailState | None) -> str:
    if tail is None:
        return "not reached"
    if not tail.torn:
        return f"clean (segment {tail.segment} ends at byte {tail.end})"
    return (
        f"torn: segment {tail.segment} has {tail.size - tail.end} byte(s) after offset "
        f"{tail.end} left by a crash mid-append (or an append still being written); they are "
        f"not part of the log, and the next appender will cut them at offset {tail.end}"
    )


def _maybe_time(time_ns: int | None) -> str | None:
    return None if time_ns is None else iso_time(time_ns)
