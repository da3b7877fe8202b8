"""``GET /events``: each image's status and progress as server-sent events, as the logs of the
engine's connected repositories record them, whichever host appended.

One thread per router (started by the first client, ended with the last) asks the engine what
changed (:meth:`StorageEngine.image_changes`, which waits on the views' followers: the views
follow the shared logs, other hosts' appends included), reads each touched image's status, and
hands the images whose status changed to every client's queue: one event per image per look,
so a burst of records is coalesced. A client too slow to take them is dropped (it reconnects
with ``Last-Event-ID``), never waited for. The event's ``id`` is a resume token
``<repo_id>:<seq>[,...]``: given back as ``Last-Event-ID`` (or ``?last_event_id=``), the images
changed after those points are sent first, each with its status now, then the live events;
without it the stream starts from now, or with ``?since=0`` from the beginning of every log.

Imports: the engine's public names (``engine``, ``engine.errors``); FastAPI, sse-starlette,
anyio and the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from engine import StorageEngine
from engine.errors import ImageNotFound, InvalidParameter, StrataError

# Seconds the thread waits for a view to move before it looks whether clients are left.
LOOK_INTERVAL = 0.25
# Batches a client may leave untaken before it is dropped (it resumes with Last-Event-ID).
MAX_QUEUED = 1000
# Seconds between keep-alive comments.
PING_SECONDS = 15

Positions = dict[str, int]


def parse_token(token: str) -> Positions:
    """``r1:12,r2:7`` -> ``{"r1": 12, "r2": 7}``; InvalidParameter if it is not one."""
    out: Positions = {}
    for part in token.split(","):
        repo_id, sep, seq = part.strip().rpartition(":")
        if not sep or not repo_id or not seq.isdigit():
            raise InvalidParameter(
                f"<repo_id>:<seq>[,<repo_id>:<seq>...], not {token!r}", name="Last-Event-ID"
            )
        out[repo_id] = int(seq)
    return out


def format_token(positions: Positions) -> str:
    return ",".join(f"{repo_id}:{seq}" for repo_id, seq in sorted(positions.items()))


def status_event(engine: StorageEngine, repo_id: str, image_id: str, seq: int) -> dict[str, Any]:
    """The image's status now, as an event's data; a removed image says ``removed``."""
    try:
        status = engine.get_image_status(repo_id, image_id).to_dict()
    except ImageNotFound:
        status = {
            "status": "removed",
            "stage": "",
            "percent_complete": -1,
            "host_id": None,
            "last_error": None,
        }
    return {
        "repo_id": repo_id,
        "image_id": image_id,
        "status": status["status"],
        "stage": status["stage"],
        "percent_complete": status["percent_complete"],
        "host_id": status["host_id"],
        "last_error": status["last_error"],
        "seq": seq,
    }


def touched_events(
    engine: StorageEngine, changes: dict[str, tuple[int, dict[str, int]]]
) -> list[dict[str, Any]]:
    """One event per touched image, in the order of their last records."""
    out = []
    for repo_id, (_, touched) in changes.items():
        for image_id, seq in sorted(touched.items(), key=lambda item: item[1]):
            try:
                out.append(status_event(engine, repo_id, image_id, seq))
            except StrataError:
                continue  # the repository went away meanwhile: nothing to say of it
    return out


@dataclass(eq=False)
class _Client:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[dict[str, Any]] | None] = field(default_factory=asyncio.Queue)
    dropped: bool = False

    def offer(self, batch: list[dict[str, Any]]) -> None:
        """On the client's loop: queue the batch, or drop a client that does not keep up."""
        if self.dropped:
            return
        if self.queue.qsize() >= MAX_QUEUED:
            self.dropped = True
            self.queue.put_nowait(None)
        else:
            self.queue.put_nowait(batch)


class StatusHub:
    """The thread that follows the engine's views for every client of one router."""

    def __init__(self, engine: StorageEngine, look_interval: float = LOOK_INTERVAL) -> None:
        self._engine = engine
        self._look_interval = look_interval
        self._lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._thread: threading.Thread | None = None
        # What was said of each image, kept while no client listens: a record that changes
        # nothing it shows (an executor's bookkeeping) is not news to the next client.
        self._said: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.errors = 0  # looks that failed (a closed engine, a view that stopped)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> _Client:
        client = _Client(loop)
        with self._lock:
            self._clients.add(client)
            if self._thread is None:
                # Where the thread starts is fixed now, so that what is appended before its
                # first look reaches this client: just the views' positions, no reading.
                start = {r: pos for r, (pos, _) in self._engine.image_changes({}).items()}
                self._thread = threading.Thread(
                    target=self._run, args=(start,), name="strata-events", daemon=True
                )
                self._thread.start()
        return client

    def unsubscribe(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def _run(self, positions: Positions) -> None:
        last = self._said
        while True:
            with self._lock:
                if not self._clients:
                    self._thread = None
                    return
            try:
                changes = self._engine.image_changes(positions, timeout=self._look_interval)
                events = []
                for event in touched_events(self._engine, changes):
                    key = (event["repo_id"], event["image_id"])
                    said = tuple(v for k, v in event.items() if k != "seq")
                    if last.get(key) != said:
                        last[key] = said
                        events.append(event)
            except Exception:
                self.errors += 1
                threading.Event().wait(self._look_interval)  # a closed engine: not a spin
                continue
            positions = {repo_id: position for repo_id, (position, _) in changes.items()}
            if events:
                with self._lock:
                    clients = list(self._clients)
                for client in clients:
                    with contextlib.suppress(RuntimeError):  # its loop is closed: it is gone
                        client.loop.call_soon_threadsafe(client.offer, events)


def events_router(
    engine: StorageEngine, *, ping_seconds: float = PING_SECONDS, hub: StatusHub | None = None
) -> APIRouter:
    """``GET /events`` over ``engine`` (see the module's docstring)."""
    hub = hub if hub is not None else StatusHub(engine)
    router = APIRouter()

    @router.get("/events", response_model=None)
    async def events(
        request: Request, last_event_id: str | None = None, since: int | None = None
    ) -> Response:
        token = request.headers.get("last-event-id") or last_event_id
        try:
            after = parse_token(token) if token else None
            if since is not None and since != 0:
                raise InvalidParameter("only since=0 (everything) is known", name="since")
        except InvalidParameter as e:
            return JSONResponse(e.to_dict(), status_code=422)
        return EventSourceResponse(
            _stream(engine, hub, after, since == 0), ping=int(ping_seconds) or 1
        )

    router.hub = hub  # type: ignore[attr-defined]  # for tests: whether its thread runs
    return router


async def _stream(
    engine: StorageEngine, hub: StatusHub, after: Positions | None, everything: bool
) -> AsyncIterator[ServerSentEvent]:
    client = hub.subscribe(asyncio.get_running_loop())
    try:
        now = await anyio.to_thread.run_sync(engine.image_changes, {})
        positions = {repo_id: position for repo_id, (position, _) in now.items()}
        bounds: Positions = {}
        replay: list[dict[str, Any]] = []
        if after is not None or everything:
            start = {repo_id: 0 for repo_id in positions} if everything else {}
            start.update(after or {})
            changes = await anyio.to_thread.run_sync(engine.image_changes, start)
            replay = await anyio.to_thread.run_sync(touched_events, engine, changes)
            replay.sort(key=lambda event: event["seq"])
            bounds = {repo_id: position for repo_id, (position, _) in changes.items()}
            positions = {**positions, **start}
        for event in replay:
            positions[event["repo_id"]] = event["seq"]
            yield _sse(event, positions)
        positions.update(bounds)
        while True:
            batch = await client.queue.get()
            if batch is None:
                return  # too slow: dropped; it resumes from its last id
            for event in batch:
                if event["seq"] <= bounds.get(event["repo_id"], -1):
                    continue  # the replay said it already, or something newer
                positions[event["repo_id"]] = event["seq"]
                yield _sse(event, positions)
    finally:
        hub.unsubscribe(client)


def _sse(event: dict[str, Any], positions: Positions) -> ServerSentEvent:
    return ServerSentEvent(
        data=json.dumps(event, separators=(",", ":")), event="status", id=format_token(positions)
    )
