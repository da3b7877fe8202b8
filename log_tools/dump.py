"""``strata-log dump``: the log's records, one line each, for people or as JSON lines.

Records are checked as they are read (the same checks as ``verify``), and only whole
transactions are shown. Segments that end before ``--from`` are skipped unread.

Imports: its own package, ``engine.log``; the standard library.
"""

from __future__ import annotations

import itertools
import json
from typing import TextIO

from engine.log.reader import ReadOnlyLog, TailState
from log_tools.render import record_json, record_line


def dump(
    log_dir: str, out: TextIO, *, as_json: bool, start: int = 1, limit: int | None = None
) -> TailState | None:
    """Write the records; return how the log ends, when the dump read that far."""
    log = ReadOnlyLog(log_dir)
    records = log.records(start)
    try:
        for record in itertools.islice(records, limit):
            if as_json:
                out.write(json.dumps(record_json(record)) + "\n")
            else:
                out.write(record_line(record) + "\n")
    finally:
        records.close()  # stopping at --limit: close the segment being read now
    return log.tail
