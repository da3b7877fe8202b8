"""Two ``strata serve`` daemons (two hosts, each with its own state directory) on one
repository: the event stream of each shows the images the other makes (architecture §10)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.server.conftest import Daemon, Place, _stop_storage_daemon, write_config


def start(place: Place, host_id: str) -> Daemon:
    state_dir = place.root / f"st-{host_id}"
    state_dir.mkdir()
    config = place.root / f"{host_id}.toml"
    sock = str(place.root / f"{host_id}.sock")
    write_config(config, host_id=host_id, state_dir=str(state_dir), socket=sock)
    return Daemon(config, sock, place.root / f"{host_id}.log").start()


class Stream:
    """The ``data`` of every event one daemon's ``GET /events`` sends, read by a thread."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=daemon.socket), base_url="http://strata", timeout=None
        )
        self.events: list[dict[str, object]] = []
        self.open = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.open.wait(10), "the stream did not open"

    def _read(self) -> None:
        try:
            with self.client.stream("GET", "/events") as response:
                self.open.set()
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
        except httpx.HTTPError:
            return  # closed at the end of the test

    def saw(self, image_id: str, timeout: float = 30.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e.get("image_id") == image_id]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no event of {image_id} in {self.events}")

    def close(self) -> None:
        self.client.close()


@contextmanager
def streams(*daemons: Daemon) -> Iterator[list[Stream]]:
    opened = [Stream(d) for d in daemons]
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def test_each_daemons_stream_sees_what_the_other_host_does(place: Place) -> None:
    repo = place.repo("r1")
    daemons: list[Daemon] = []
    try:
        host_a = start(place, "host-a")
        daemons.append(host_a)
        host_b = start(place, "host-b")
        daemons.append(host_b)
        a, b = host_a.client(), host_b.client()
        params = {"format": "localfs-1.0", "connection_parameters": {"path": repo}}
        assert a.post("/repositories", json=params).status_code == 201
        for client in (a, b):
            assert client.post("/repositories/r1/connect", json=params).status_code == 200

        with streams(host_a, host_b) as (from_a, from_b):
            made_on_a = a.post("/repositories/r1/images", json={"size": 1 << 20})
            made_on_b = b.post("/repositories/r1/images", json={"size": 1 << 20})
            assert made_on_a.status_code == made_on_b.status_code == 201
            disk_a, disk_b = made_on_a.json()["image_id"], made_on_b.json()["image_id"]

            # Each host's stream shows the other host's disk, up to its end.
            for stream, disk in ((from_b, disk_a), (from_a, disk_b)):
                stream.saw(disk)
                deadline = time.monotonic() + 30
                while (
                    not any(e["status"] == "optimized" for e in stream.saw(disk))
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                assert any(e["status"] == "optimized" for e in stream.saw(disk))
                assert all(e["repo_id"] == "r1" for e in stream.saw(disk))
        for d in daemons:
            assert d.stop() == 0
    finally:
        for d in daemons:
            d.kill()
        for host in ("host-a", "host-b"):
            _stop_storage_daemon(str(Path(place.root) / f"st-{host}"))
