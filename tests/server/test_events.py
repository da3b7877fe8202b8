"""``GET /events`` (strata_server/events.py) served by a real uvicorn on a Unix socket: the
status events of a new disk, resuming with ``Last-Event-ID``, another host's appends, and a
client that goes away in the middle of a stream."""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from engine import StorageEngine
from engine.errors import InvalidParameter
from strata_server.events import StatusHub, events_router, parse_token
from tests.hosts.hostlib import HostProcess, formatted_repositories, host_spec

MiB = 2**20
Event = dict[str, Any]


class Server:
    """uvicorn in a thread of this process, serving the events router and ``/health``."""

    def __init__(self, engine: StorageEngine) -> None:
        self.dir = tempfile.mkdtemp(prefix="strata-ev-")
        self.socket = f"{self.dir}/api.sock"
        app = FastAPI()
        router = events_router(engine, ping_seconds=1)
        self.hub: StatusHub = router.hub  # type: ignore[attr-defined]
        app.include_router(router)
        app.get("/health")(lambda: {"host_id": engine.host_id})
        self.server = uvicorn.Server(uvicorn.Config(app, uds=self.socket, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket),
            base_url="http://strata",
            timeout=httpx.Timeout(30.0),
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Stream:
    """An open ``GET /events``: its events as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()

    def next(self) -> Event:
        """The next status event (pings skipped), with its ``id`` under ``"_id"``."""
        fields: dict[str, str] = {}
        for line in self.lines:
            if line == "":
                if fields.get("event") == "status":
                    event: Event = json.loads(fields["data"])
                    event["_id"] = fields["id"]
                    return event
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        raise AssertionError("the stream ended")

    def until(self, done: Callable[[Event], bool]) -> list[Event]:
        seen = []
        while True:
            seen.append(self.next())
            if done(seen[-1]):
                return seen


@contextlib.contextmanager
def stream(
    client: httpx.Client, server: Server, headers: dict[str, str] | None = None, **params: Any
) -> Iterator[Stream]:
    with client.stream("GET", "/events", headers=headers, params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 10
        while server.hub.clients == 0:  # subscribed: what comes next reaches it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield Stream(response)


def optimized(image_id: str) -> Callable[[Event], bool]:
    return lambda e: e["image_id"] == image_id and e["status"] == "optimized"


@pytest.fixture
def serve() -> Iterator[Callable[[StorageEngine], Server]]:
    servers: list[Server] = []

    def make(engine: StorageEngine) -> Server:
        servers.append(Server(engine))
        return servers[-1]

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


def test_a_new_disk_is_followed_up_to_optimized(
    engines: Callable[..., StorageEngine], serve: Callable[[StorageEngine], Server]
) -> None:
    engine = engines("host-a")
    server = serve(engine)
    with server.client() as client, stream(client, server) as events:
        disk = engine.create_virtual_disk("r1", 4 * MiB)
        seen = events.until(optimized(disk))
    assert {e["image_id"] for e in seen} == {disk}
    last = seen[-1]
    assert set(last) == {
        "repo_id", "image_id", "status", "stage", "percent_complete", "host_id", "last_error",
        "seq", "_id",
    }  # fmt: skip
    assert last["repo_id"] == "r1" and last["host_id"] == "host-a"
    assert last["status"] == engine.get_image_status("r1", disk).status
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert parse_token(last["_id"]) == {"r1": last["seq"]}


def test_resuming_sends_exactly_what_was_missed_then_live_events(
    engines: Callable[..., StorageEngine], serve: Callable[[StorageEngine], Server]
) -> None:
    engine = engines("host-a")
    server = serve(engine)
    with server.client() as client:
        with stream(client, server) as events:
            first = engine.create_virtual_disk("r1", 4 * MiB)
            token = events.until(optimized(first))[-1]["_id"]
        engine.wait_for_image("r1", first, timeout=30)
        # Missed while away: a second disk, created and made.
        second = engine.create_virtual_disk("r1", 4 * MiB)
        engine.wait_for_image("r1", second, timeout=30)
        assert second in engine.image_changes(parse_token(token))["r1"][1]

        for how in ("header", "query"):
            missed = engine.image_changes(parse_token(token))["r1"][1]
            kwargs: dict[str, Any] = (
                {"headers": {"Last-Event-ID": token}}
                if how == "header"
                else {"last_event_id": token}
            )
            with stream(client, server, **kwargs) as events:
                replayed = [events.next() for _ in missed]
                assert {e["image_id"] for e in replayed} == set(missed), how
                assert all(e["seq"] > parse_token(token)["r1"] for e in replayed)
                mine = next(e for e in replayed if e["image_id"] == second)
                assert mine["status"] == "optimized" and mine["seq"] == missed[second]
                # Then live: a third disk.
                third = engine.create_virtual_disk("r1", 4 * MiB)
                live = events.until(optimized(third))
                assert {e["image_id"] for e in live} == {third}
                assert live[0]["seq"] > max(e["seq"] for e in replayed)
                engine.wait_for_image("r1", third, timeout=30)

        # From the beginning: every image once, then nothing more is owed.
        with stream(client, server, since=0) as events:
            everything = [events.next() for _ in engine.list_images("r1")]
        assert {e["image_id"] for e in everything} == {i.image_id for i in engine.list_images("r1")}

        bad = client.get("/events", headers={"Last-Event-ID": "r1:twelve"})
        assert bad.status_code == 422
        assert bad.json()["code"] == "invalid_parameter"


def test_a_stream_on_one_host_sees_another_hosts_appends(
    tmp_path: Path, state_dir: Callable[[], str], serve: Callable[[StorageEngine], Server]
) -> None:
    repos = formatted_repositories(tmp_path, ("r1",))
    with StorageEngine("host-a", state_dir=state_dir(), poll_interval=0.1) as engine:
        engine.connect_storage_repository("r1", "localfs-1.0", {"path": repos["r1"]})
        server = serve(engine)
        with server.client() as client, stream(client, server) as events:
            spec = host_spec(
                "host-b",
                state_dir(),
                repos,
                run_executors=False,
                steps=[{"call": "create_virtual_disk", "args": ["r1", 4 * MiB], "save": "disk"}],
            )
            host_b = HostProcess(spec)
            try:
                disk = host_b.saved("disk")
                seen = events.until(lambda e: e["image_id"] == disk)
                assert seen[-1]["repo_id"] == "r1"
                # host-a's executors make it; the stream follows that too.
                events.until(optimized(disk))
                host_b.wait_for("holding")
            finally:
                host_b.close()
                host_b.kill()


def test_a_client_that_leaves_frees_its_resources_and_others_are_served(
    engines: Callable[..., StorageEngine], serve: Callable[[StorageEngine], Server]
) -> None:
    engine = engines("host-a")
    server = serve(engine)
    before = {t.ident for t in threading.enumerate()}
    with server.client() as client:
        for _ in range(3):
            with stream(client, server) as events:
                disk = engine.create_virtual_disk("r1", 4 * MiB)
                events.next()  # in the middle of its events: it leaves
            engine.wait_for_image("r1", disk, timeout=30)
        deadline = time.monotonic() + 10
        while server.hub.clients or server.hub.running:
            assert time.monotonic() < deadline, "the stream's resources were not freed"
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name == "strata-events"]
        # Only uvicorn's and anyio's pooled worker threads may have come, not one per stream.
        assert len({t.ident for t in threading.enumerate()} - before) <= 4

        assert client.get("/health").json() == {"host_id": "host-a"}
        with stream(client, server) as events:
            disk = engine.create_virtual_disk("r1", 4 * MiB)
            events.until(optimized(disk))


def test_a_quiet_stream_is_kept_alive_with_pings(
    engines: Callable[..., StorageEngine], serve: Callable[[StorageEngine], Server]
) -> None:
    engine = engines("host-a")
    server = serve(engine)  # pings every second
    with server.client() as client, stream(client, server) as events:
        started = time.monotonic()
        line = next(line for line in events.lines if line)
        assert line.startswith(":") and "ping" in line
        assert 0.5 < time.monotonic() - started < 5


def test_image_changes_says_what_the_log_recorded_since_a_point(
    engines: Callable[..., StorageEngine],
) -> None:
    engine = engines("host-a", run_executors=False)
    (position, touched) = engine.image_changes({})["r1"]
    assert touched == {}
    disk = engine.create_virtual_disk("r1", 4 * MiB)
    after, touched = engine.image_changes({"r1": position})["r1"]
    assert after > position and touched == {disk: after}
    assert engine.image_changes({"r1": after})["r1"] == (after, {})
    assert engine.image_changes({"elsewhere": 3}) == {"r1": (after, {})}
    # Nothing new: it waits for the view to move, then says what it has.
    started = time.monotonic()
    assert engine.image_changes({"r1": after}, timeout=0.3)["r1"] == (after, {})
    assert time.monotonic() - started >= 0.25
    for bad in ({"r1": -1}, {"r1": "3"}, ["r1"]):
        with pytest.raises(InvalidParameter):
            engine.image_changes(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter):
        engine.image_changes({}, timeout=-1)
