"""An image's history across the repositories its migrations took it through (docs/adr/0029).

A migrated image keeps its id in both repositories: the source's log tells its life up to its
removal there, the destination's from the replica on. Each log names the other's root (a
replica's origin ``of``, a ``ReplicationStarted`` target, a removal "migrated to <root>"), so
``strata-log history`` reads those logs too, and the ones they name in turn (A -> B -> C, and
back), each repository once and at most ``MAX_REPOSITORIES`` of them. A repository named but
gone, or whose log cannot be read, is a note: the history asked for is that of PATH's log, the
rest is what helps to read it.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.errors import StrataError
from log_tools.failures import from_os_error
from log_tools.paths import find_log_dir, repository_root

# Migrations there and back name each repository again; this bounds a chain of distinct ones.
MAX_REPOSITORIES = 16

# The reason of a migrated image's removal in the source: "migrated to <destination root>".
MIGRATED_TO = "migrated to "

ReadLog = Callable[[str, str], list[dict[str, Any]]]


@dataclass
class Traced:
    """The merged history: each entry with its ``repository`` (its root, or the log directory
    of a log outside any repository), the repositories read, PATH's first, and notes."""

    entries: list[dict[str, Any]]
    repositories: list[str]
    notes: list[str] = field(default_factory=list)


def trace(path: str, image_id: str, read: ReadLog) -> Traced:
    """The image's history in the log at ``path`` and in the logs of the repositories it names,
    merged by time; ``read(log_dir, image_id)`` is one log's history (raises if PATH's log does
    not name the image: that stays an error)."""
    log_dir = find_log_dir(path)
    first = repository_root(log_dir) or log_dir
    histories = [_labelled(read(log_dir, image_id), first)]
    traced = Traced([], [first])
    visited = {os.path.realpath(first)}
    pending = list(_named(histories[0], first))
    while pending:
        root, named_by = pending.pop(0)
        if os.path.realpath(root) in visited:
            continue
        if len(traced.repositories) >= MAX_REPOSITORIES:
            visited.add(os.path.realpath(root))  # said once
            traced.notes.append(
                f"the repository at {root} ({named_by}) is not read: the history stops at "
                f"{MAX_REPOSITORIES} repositories"
            )
            continue
        visited.add(os.path.realpath(root))
        entries = _read_other(root, image_id, read, named_by, traced.notes)
        if entries is None:
            continue
        histories.append(_labelled(entries, root))
        traced.repositories.append(root)
        pending.extend(_named(histories[-1], root))
    # Each log keeps its own order (its hosts' clocks may disagree); between logs, time decides.
    traced.entries = list(heapq.merge(*histories, key=lambda entry: int(entry["time_ns"])))
    return traced


def _read_other(
    root: str, image_id: str, read: ReadLog, named_by: str, notes: list[str]
) -> list[dict[str, Any]] | None:
    if not os.path.isabs(root):  # the engine names roots absolute: not a log it wrote
        notes.append(f"{root!r} ({named_by}) is not an absolute path: not followed")
        return None
    if not os.path.isdir(root):
        notes.append(f"the repository at {root} ({named_by}) is gone: its part is not shown")
        return None
    if repository_root(root) != os.path.abspath(root):
        notes.append(
            f"{root} ({named_by}) is not a repository (no STRATA-REPOSITORY): its part is not shown"
        )
        return None
    try:
        return read(find_log_dir(root), image_id)
    except StrataError as e:  # a damaged log there, or one that no longer names the image
        error = e
    except OSError as e:
        error = from_os_error(e, None)
    notes.append(f"the log of {root} ({named_by}) is not read: {error.message}")
    return None


def _labelled(entries: list[dict[str, Any]], repository: str) -> list[dict[str, Any]]:
    return [{"repository": repository, **entry} for entry in entries]


def _named(entries: list[dict[str, Any]], repository: str) -> Iterator[tuple[str, str]]:
    """The roots of other repositories the entries name, each with where it is named."""
    for entry in entries:
        root = other_root(entry["event"], entry["fields"])
        if root:
            yield os.path.normpath(root), f"named by event {entry['seq']} of {repository}"


def other_root(event: str, fields: dict[str, Any]) -> str | None:
    """The other repository an event of a migration names, if it is one."""
    value: Any = None
    if event in ("ImageRequested", "ReplicaRenewed"):
        origin = fields.get("origin")
        if isinstance(origin, dict) and origin.get("how") == "replica":
            value = origin.get("of")
    elif event in ("ReplicationStarted", "ReplicationEnded"):
        value = fields.get("target")
    elif event == "ReplicaSwitched":
        value = fields.get("source")
    elif event == "ImageRemoved":
        reason = fields.get("reason")
        if isinstance(reason, str) and reason.startswith(MIGRATED_TO):
            value = reason[len(MIGRATED_TO) :]
    return value if isinstance(value, str) and value else None
