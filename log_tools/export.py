"""``strata-log export``: the log's projections as SQLite tables, for Datasette or any client.

``images`` (one row per image, status as the engine computes it), ``events`` (every record
up to the point, decoded: the history of every image), ``fixes`` (what a check would have
offered, from the log alone), ``hosts`` (each host that appended, with its heartbeat when the
repository has one), ``claims`` (stages claimed and not finished) and ``export`` (where the
tables come from). The database is written to a temporary file beside it and renamed into
place (:mod:`log_tools.output`), so a failed export leaves nothing half written and no
temporary; a database inside the repository is refused, as the tools only read there.

Imports: its own package, ``engine.errors``, ``engine.log``, ``engine.opaque``,
``engine.projections``, sqlite-utils; the standard library.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from sqlite_utils import Database

from engine.errors import ToolFailed
from engine.log.reader import ReadOnlyLog
from engine.opaque import json_ready
from engine.projections.log_events import new_mapper, to_event
from engine.projections.point_in_time import Replay
from log_tools import hosts, output
from log_tools.paths import repository_root
from log_tools.render import event_fields, iso_time, plain
from log_tools.replay import FIXES_BASIS, UNTIL_HELP, fix_dict, replay_at


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "export",
        help="write the projections to a SQLite database (images, events, fixes, hosts)",
        description="Write the state at a point in the log (default: its end) as SQLite tables "
        "that Datasette or any SQLite client opens: images, events, fixes, hosts, claims.",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("database", metavar="DB.sqlite", help="the database file to write")
    command.add_argument("--until", metavar="SEQ|ISO-TIME", help=UNTIL_HELP)
    command.add_argument("--replace", action="store_true", help="overwrite an existing file")
    command.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    target = output.writable_target(
        args.path, args.database, name="DB", replace=args.replace, devices=False
    )
    counts = export(args.path, target, args.until)
    print(f"wrote {target}: " + ", ".join(f"{n} {table}" for table, n in counts.items()))
    return 0


# Every table is created with its columns, so an empty one is still there to query.
SCHEMAS: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "images": (
        {
            "image_id": str, "kind": str, "size": int, "status": str, "stage": str,
            "percent_complete": int, "host_id": str, "last_error": str, "removed": int,
            "created": str, "modified": str, "version": int, "chain_depth": int, "chain": str,
            "user_data": str,
        },
        "image_id",
    ),
    "events": (
        {
            "seq": int, "time": str, "time_ns": int, "host_id": str, "aggregate_id": str,
            "aggregate_version": int, "event": str, "topic": str, "txn_last": int, "fields": str,
            "prev_hash": str,
        },
        "seq",
    ),
    "fixes": (
        {"position": int, "type": str, "image_ids": str, "description": str, "data": str},
        "position",
    ),
    "hosts": (
        {
            "host_id": str, "state": str, "records": int, "first_seq": int, "first_time": str,
            "last_seq": int, "last_time": str, "heartbeat_time": str,
            "heartbeat_age_seconds": float, "heartbeat": str, "claims": int,
        },
        "host_id",
    ),
    "claims": (
        {
            "image_id": str, "op_id": str, "purpose": str, "stage": str, "epoch": int,
            "host_id": str, "host_state": str, "left_claimed": int, "claimed_seq": int,
            "claimed_time": str,
        },
        ("image_id", "op_id"),
    ),
    "export": ({"key": str, "value": str}, "key"),
}  # fmt: skip


def export(path: str, target: str, until: str | None) -> dict[str, int]:
    log_dir, state = replay_at(path, until)
    with output.replacing(target) as temporary:
        db = Database(temporary)
        # The file is new and thrown away on any failure: a journal and a sync per batch of
        # rows would only slow it down (25 s for 60,000 events, most of it waiting on syncs).
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        try:
            return _fill(db, path, log_dir, state)
        except sqlite3.Error as e:  # a full disk, most likely: SQLite says so in its words
            raise ToolFailed(f"writing {target} failed: {e}") from e
        finally:
            db.close()  # before the file is renamed or removed


def _fill(db: Database, path: str, log_dir: str, state: Replay) -> dict[str, int]:
    """Every table, and how many rows each holds."""
    for name, (columns, pk) in SCHEMAS.items():
        db.table(name).create(columns, pk=pk)
    db.table("claims").add_foreign_key("image_id", "images", "image_id")
    images = [
        {**row, "chain": json.dumps(row["chain"]), "user_data": _json(row["user_data"])}
        for row in state.statuses()
    ]
    db.table("images").insert_all(images)
    db.table("events").insert_all(events(log_dir, state.position), batch_size=5000)
    db.table("events").create_index(["aggregate_id", "seq"])
    fixes = [
        {**fix_dict(f), "position": i, "image_ids": json.dumps(list(f.image_ids))}
        for i, f in enumerate(state.fixes())
    ]
    db.table("fixes").insert_all(fixes)
    report = hosts.hosts_report(repository_root(path), state, time.time())
    db.table("hosts").insert_all([_flat(h) for h in report["hosts"]])
    db.table("claims").insert_all(report["claims"])
    db.table("export").insert_all(
        [
            {"key": "log_directory", "value": log_dir},
            {"key": "position", "value": str(state.position)},
            {"key": "time", "value": "" if state.time_ns is None else iso_time(state.time_ns)},
            {"key": "log_ends_here", "value": str(state.ended)},
            {"key": "fixes_basis", "value": FIXES_BASIS},
            {"key": "exported_at", "value": iso_time(time.time_ns())},
        ]
    )
    return {name: db.table(name).count for name in SCHEMAS if name != "export"}


def events(log_dir: str, until_seq: int) -> Iterator[dict[str, Any]]:
    """Every record up to ``until_seq``, with its event's own fields as JSON."""
    mapper = new_mapper()
    records = ReadOnlyLog(log_dir).records()
    try:
        for record in records:
            if record.seq > until_seq:
                return
            event = to_event(mapper, record)
            fields = event_fields(event)
            yield {
                "seq": record.seq,
                "time": iso_time(record.time_ns),
                "time_ns": record.time_ns,
                "host_id": record.host_id,
                "aggregate_id": str(record.originator_id),
                "aggregate_version": record.originator_version,
                "event": type(event).__name__,
                "topic": record.topic,
                "txn_last": int(record.txn_last),
                "fields": _json(fields),
                "prev_hash": record.prev_hash.hex(),
            }
    finally:
        records.close()


def _json(value: Any) -> str:
    return json.dumps(json_ready(value), default=plain)  # json_ready: bytes keys in user data


def _flat(host: dict[str, Any]) -> dict[str, Any]:
    return {k: _json(v) if isinstance(v, dict | list) else v for k, v in host.items()}
