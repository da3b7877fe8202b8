"""The host-local SQLite read model of one repository: a row per image and the log position.

A cache of the view (engine/projections/view.py), so that a restart reads only the records
appended since, and a place where tools can query images with SQL. The rows and the position
they reflect are written in one transaction, so the model is never ahead of or behind its own
position. Losing the file costs only a rebuild from the log.

``images`` holds the columns people query (``status`` is what the log alone says: a check's
lost volumes are not in it) and ``state``, the whole folded aggregate the view reloads.
``tracking`` holds the position with a mark of the record there, so a model is recognised as
belonging to another log (one replaced or restored from a backup) and rebuilt.

Imports: its own package, ``engine.aggregates``, ``engine.errors``, ``engine.opaque``,
``engine.types``, sqlite-utils; the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from engine.aggregates.image import Image
from engine.errors import sqlite_error
from engine.opaque import json_ready, value_of
from engine.projections import folded_state
from engine.types import ImageStatus

_TRACKING_ID = "view"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where in the log the model is: the sequence and the record's chain hash and time."""

    position: int
    prev_hash: bytes
    time_ns: int


@dataclass(frozen=True, slots=True)
class Stored:
    checkpoint: Checkpoint
    repository: dict[str, Any] | None
    images: list[tuple[Image, str | None]]  # each image and the last host that worked on it
    origin_ns: int | None = None  # the time of the log's first record: which log this is


def image_row(image: Image, worker: str | None, status: ImageStatus) -> dict[str, Any]:
    return {
        "id": image.id_text,
        "kind": image.kind,
        "size": image.size,
        "status": status.status,
        "stage": status.stage,
        "percent_complete": status.percent_complete,
        "host_id": status.host_id,
        "last_error": image.last_error,
        "removed": int(image.removed),
        "created": image.created_on.isoformat(),
        "chain": json.dumps(image.chain),
        "user_data": json.dumps(json_ready(value_of(image.user_data)), default=str),
        "version": image.version,
        "state": folded_state.encode(image, worker),
    }


class ReadModel:
    """One SQLite file; callers serialize access (the view holds its lock around every call)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            try:
                self._open()
            except sqlite3.OperationalError:
                raise  # cannot open or write here (permissions, a full disk): not damage
            except sqlite3.DatabaseError:
                # Not a database any more (a torn copy, a disk error): it is only a cache.
                self._conn.close()
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + suffix)
                self._open()
        except sqlite3.Error as e:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self._conn.close()
            raise sqlite_error(e, "Opening this host's read model", path) from e

    def _open(self) -> None:
        # The view is used from several threads, one at a time under its lock.
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self.db = Database(self._conn)
        # A cache: WAL without an fsync per commit keeps commits cheap; a crash loses at most
        # the last commits, never the agreement between rows and position.
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db.atomic():
            self.db.table("images").create(
                {
                    "id": str,
                    "kind": str,
                    "size": int,
                    "status": str,
                    "stage": str,
                    "percent_complete": int,
                    "host_id": str,
                    "last_error": str,
                    "removed": int,
                    "created": str,
                    "chain": str,
                    "user_data": str,
                    "version": int,
                    "state": bytes,
                },
                pk="id",
                if_not_exists=True,
            )
            self.db.table("tracking").create(
                {
                    "id": str,
                    "schema": str,
                    "position": int,
                    "prev_hash": bytes,
                    "time_ns": int,
                    "repository": str,
                },
                pk="id",
                if_not_exists=True,
            )
            # The time of the log's first record: which log the model was made of, so that a
            # log found shorter than the model is told apart as cut or as another one.
            self.db.table("origin").create({"id": str, "time_ns": int}, pk="id", if_not_exists=True)
        self._upsert = (
            "INSERT OR REPLACE INTO images (id, kind, size, status, stage, percent_complete, "
            "host_id, last_error, removed, created, chain, user_data, version, state) VALUES "
            "(:id, :kind, :size, :status, :stage, :percent_complete, :host_id, :last_error, "
            ":removed, :created, :chain, :user_data, :version, :state)"
        )

    def load(self) -> Stored | None:
        """What the model holds, or None when it is empty or was written for other code."""
        rows = list(self.db.query("SELECT * FROM tracking WHERE id = ?", [_TRACKING_ID]))
        if not rows or rows[0]["schema"] != folded_state.SCHEMA:
            return None
        tracking = rows[0]
        try:
            images = [
                folded_state.decode(row[0])
                for row in self.db.execute("SELECT state FROM images").fetchall()
            ]
        except ValueError:  # a row of another layout: the whole model is for other code
            return None
        repository = json.loads(tracking["repository"]) if tracking["repository"] else None
        checkpoint = Checkpoint(tracking["position"], tracking["prev_hash"], tracking["time_ns"])
        origin = list(self.db.query("SELECT time_ns FROM origin WHERE id = ?", [_TRACKING_ID]))
        return Stored(checkpoint, repository, images, origin[0]["time_ns"] if origin else None)

    def save(
        self,
        checkpoint: Checkpoint,
        repository: dict[str, Any] | None,
        rows: Iterable[dict[str, Any]],
        origin_ns: int | None = None,
    ) -> None:
        """Write image rows and the position they reflect, atomically (and the time of the
        log's first record when it is given)."""
        with self.db.atomic():
            self.db.conn.executemany(self._upsert, rows)
            if origin_ns is not None:
                self.db.conn.execute(
                    "INSERT OR REPLACE INTO origin (id, time_ns) VALUES (?, ?)",
                    (_TRACKING_ID, origin_ns),
                )
            self.db.conn.execute(
                "INSERT OR REPLACE INTO tracking (id, schema, position, prev_hash, time_ns, "
                "repository) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _TRACKING_ID,
                    folded_state.SCHEMA,
                    checkpoint.position,
                    checkpoint.prev_hash,
                    checkpoint.time_ns,
                    None if repository is None else json.dumps(repository),
                ),
            )

    def reset(self) -> None:
        """Forget everything: the next save starts a model from the beginning of the log."""
        with self.db.atomic():
            self.db.execute("DELETE FROM images")
            self.db.execute("DELETE FROM tracking")
            self.db.execute("DELETE FROM origin")

    def close(self) -> None:
        self.db.close()
