"""One open :class:`OperationLog` per log directory and host id in this process, shared.

A log keeps its index in memory and group-commits the appends of its threads, so every
recorder and application of one host on one directory must use the same instance; the last
one to let go closes it. Two host ids on one directory get two instances (each record names
the host that appended it), which exclude each other through the log's lock like two
processes would.

Imports: ``engine.errors``, ``engine.log``; the standard library.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from engine.errors import InvalidParameter, NotAStrataLog
from engine.log import OperationLog


@dataclass(slots=True)
class _Shared:
    log: OperationLog
    segment_size: int | None
    users: int


_mutex = threading.Lock()
_logs: dict[tuple[str, str], _Shared] = {}


def acquire_log(
    directory: str, host_id: str, *, create: bool = False, segment_size: int | None = None
) -> OperationLog:
    """The shared log of ``directory`` for ``host_id``, opened (or created) on first use."""
    key = (os.path.realpath(directory), host_id)
    with _mutex:
        shared = _logs.get(key)
        if shared is None:
            shared = _Shared(_open(key[0], host_id, create, segment_size), segment_size, 0)
            _logs[key] = shared
        elif segment_size is not None and segment_size != shared.segment_size:
            raise InvalidParameter(
                f"{segment_size}, but this process already has the log open with segments of "
                f"{shared.segment_size or 'the default size'}",
                name="segment_size",
            )
        shared.users += 1
        return shared.log


def release_log(log: OperationLog) -> None:
    """Give back a log from :func:`acquire_log`; the last user closes it."""
    with _mutex:
        for key, shared in _logs.items():
            if shared.log is log:
                shared.users -= 1
                if shared.users == 0:
                    del _logs[key]
                    log.close()
                return


def _open(directory: str, host_id: str, create: bool, segment_size: int | None) -> OperationLog:
    options: dict[str, object] = {} if segment_size is None else {"segment_size": segment_size}
    try:
        return OperationLog.open(directory, host_id, **options)
    except NotAStrataLog:
        if not create:
            raise
    try:
        return OperationLog.create(directory, host_id, **options)
    except InvalidParameter:
        # Another process created it between our two looks; anything else fails again here.
        return OperationLog.open(directory, host_id, **options)
