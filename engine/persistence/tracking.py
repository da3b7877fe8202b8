"""Where a projection on this host has read the log up to: a local SQLite file, not the log.

Projection positions belong to one host's read models, so they never go into the shared log
(other hosts would replay them as events). One row per projection holds its position; a
position only moves forward, so delivering a notification twice is refused rather than applied
twice. A projection that keeps its rows in the same database writes rows and position in one
:meth:`SQLiteTrackingRecorder.transaction`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlite_utils
from eventsourcing.persistence import IntegrityError, OperationalError, Tracking, TrackingRecorder

IN_MEMORY = ":memory:"
TABLE = "tracking"

# Moves the position forward only: the WHERE makes the upsert a no-op (no row returned) for a
# notification at or below the recorded one.
_ADVANCE = (
    f"INSERT INTO {TABLE} (application_name, notification_id) VALUES (?, ?) "
    f"ON CONFLICT (application_name) DO UPDATE SET notification_id = excluded.notification_id "
    f"WHERE {TABLE}.notification_id < excluded.notification_id RETURNING notification_id"
)


class SQLiteTrackingRecorder(TrackingRecorder):
    """Tracking positions in ``path`` (a host-local file; by default an in-memory database)."""

    def __init__(self, path: str = IN_MEMORY, *, timeout: float = 30.0) -> None:
        self.path = path
        try:
            # One connection shared by this recorder's threads, serialized by our own lock.
            conn = sqlite3.connect(
                path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise OperationalError(f"cannot open tracking database {path}: {e}") from e
        if path != IN_MEMORY:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        self.db = sqlite_utils.Database(conn)
        self.db.table(TABLE).create(
            {"application_name": str, "notification_id": int},
            pk="application_name",
            if_not_exists=True,
        )

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction; a projection puts its rows and :meth:`record_position` in it."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def record_position(self, db: sqlite_utils.Database, tracking: Tracking) -> None:
        """Move ``tracking.application_name`` to ``tracking.notification_id`` inside ``db``."""
        cursor = db.execute(_ADVANCE, [tracking.application_name, tracking.notification_id])
        if not cursor.fetchall():  # fetch all: a pending RETURNING row would block COMMIT
            raise IntegrityError(
                f"{tracking.application_name} is already at or past notification "
                f"{tracking.notification_id}"
            )

    def insert_tracking(self, tracking: Tracking) -> None:
        with self.transaction() as db:
            self.record_position(db, tracking)

    def max_tracking_id(self, application_name: str) -> int | None:
        with self._lock:
            row = self.db.execute(
                f"SELECT notification_id FROM {TABLE} WHERE application_name = ?",
                [application_name],
            ).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
