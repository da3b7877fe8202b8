"""``--until SEQ|ISO-TIME``: a point in the log, as the tools take it on the command line.

A whole number is a sequence number. Anything else must be an ISO 8601 time; one without a
zone is UTC (the log's times are). Fractions of a second may have up to nine digits, so a time
copied from ``strata-log dump`` names exactly the record it was printed beside.

Imports: ``engine.errors``, ``engine.projections``; the standard library.
"""

from __future__ import annotations

import datetime
import re

from engine.errors import InvalidParameter
from engine.projections.point_in_time import Until

_FRACTION = re.compile(r"^(?P<head>[^.,]*[T ][0-9:]+)[.,](?P<digits>[0-9]{1,9})(?P<tail>.*)$")


def parse_until(text: str, now_ns: int) -> Until:
    """The point ``text`` names; a time later than ``now_ns`` is refused."""
    text = text.strip()
    if text.isdigit():
        seq = int(text)
        if seq < 1:
            raise InvalidParameter("a sequence number starts at 1", name="--until")
        return Until(seq=seq)
    time_ns = parse_time(text)
    if time_ns > now_ns:
        raise InvalidParameter(
            f"{text} is in the future; the log cannot say what has not happened yet",
            name="--until",
        )
    return Until(time_ns=time_ns)


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch of an ISO 8601 time (UTC when it names no zone)."""
    nanos = 0
    match = _FRACTION.match(text)
    if match:
        digits = match["digits"]
        nanos = int(digits.ljust(9, "0"))
        text = match["head"] + match["tail"]
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParameter(
            f"neither a sequence number nor an ISO 8601 time: {text!r} "
            "(e.g. 42 or 2026-11-21T20:34:19.123456789Z)",
            name="--until",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    seconds = int(moment.timestamp())  # whole seconds: the fraction was taken off above
    return seconds * 1_000_000_000 + moment.microsecond * 1000 + nanos
