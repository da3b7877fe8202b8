"""``--wait`` of the ``strata`` command line: one progress bar per image, moved by the daemon's
event stream (``GET /events``) until each image is optimized or has failed.

Imports: its own package (``strata_server.client``); rich; the standard library.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from strata_server.client import ApiError, StrataClient


def _ended(status: dict[str, Any]) -> bool:
    """Optimized, or failed: a new image is ``broken`` (its data not yet in place) while a host
    works on it, so what tells a failure is a ``last_error`` (architecture §6: an image that is
    not optimized has a host working on it, or a last_error and a fix)."""
    return status.get("status") == "optimized" or status.get("last_error") is not None


def follow_stream(
    client: StrataClient,
    events: Iterator[dict[str, Any]],
    images: list[tuple[str, str]],
    *,
    console: Console,
    quiet: bool = False,
) -> None:
    """One bar per image, moved by the stream's events until each is optimized or has failed.

    The stream is already open, so the status read once here is the starting point and every
    later change arrives as an event."""
    progress = Progress(
        TextColumn("{task.fields[image]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[stage]} {task.fields[status]}"),
        console=console,
        transient=False,
        disable=quiet,
    )
    tasks: dict[tuple[str, str], TaskID] = {}
    final: dict[tuple[str, str], dict[str, Any]] = {}
    with progress:
        for repo, image_id in images:
            tasks[(repo, image_id)] = progress.add_task(
                "", total=100, image=image_id[:8], stage="", status="pending"
            )
            status = client.get(f"/repositories/{repo}/images/{image_id}/status")
            _show(progress, tasks[(repo, image_id)], status, final, (repo, image_id))
        for event in events if len(final) < len(images) else ():
            key = (str(event.get("repo_id")), str(event.get("image_id")))
            if key in tasks and key not in final:
                _show(progress, tasks[key], event, final, key)
            if len(final) == len(images):
                break
    if len(final) < len(images):
        raise ApiError("events_unavailable", "the event stream ended before the work did")
    failed = [s for s in final.values() if s.get("status") != "optimized"]
    if failed:
        raise ApiError(
            "image_failed",
            f"image {failed[0].get('image_id')} is {failed[0].get('status')}:"
            f" {failed[0].get('last_error')} (see `strata check`)",
        )


def _show(
    progress: Progress,
    task: TaskID,
    status: dict[str, Any],
    final: dict[tuple[str, str], dict[str, Any]],
    key: tuple[str, str],
) -> None:
    state = str(status.get("status"))
    percent = status.get("percent_complete")
    done = 100 if state == "optimized" else max(int(percent or 0), 0)
    progress.update(task, completed=done, stage=status.get("stage") or "", status=state)
    if _ended(status):
        final[key] = status
