"""``strata``, the operator's command line, through its real entry point (a subprocess) against
a fake daemon: a small FastAPI app served by uvicorn on a short Unix socket, with canned answers,
typed errors and an event stream. The real daemon is tested in test_api*.py; here what matters is
what the operator sees: exit status, the code of an error, ``--json`` that parses into the API's
shapes, SIZE parsing, fix numbering, and ``--wait`` moved by the stream, not by polling.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter
from sse_starlette.sse import EventSourceResponse

ROOT = Path(__file__).resolve().parents[2]

# --- what --json must parse into (the API's shapes: engine.types' to_dict()) -----------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageId(Strict):
    image_id: str


class ImageStatus(Strict):
    image_id: str
    status: str
    host_id: str | None
    stage: str
    percent_complete: int
    last_error: str | None


class ImageInfo(Strict):
    image_id: str
    kind: str
    size: int
    user_data: Any
    created: str
    chain_depth: int
    repo_id: str


class Fix(Strict):
    type: str
    image_ids: list[str]
    description: str
    data: str


class Error(Strict):
    code: str
    message: str
    vdsm_code: int | None = None


Fixes = TypeAdapter(list[Fix])
Infos = TypeAdapter(list[ImageInfo])

# --- the fake daemon --------------------------------------------------------------------------


@dataclass
class FakeDaemon:
    """What the fake daemon was asked, and what it answers."""

    socket: str
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    checks: int = 0
    status_reads: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    events_available: bool = True
    events_per_stream: int | None = None  # a stream that ends early, as for a dropped client
    last_event_ids: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def image(self, image_id: str, kind: str = "virtual-disk", size: int = 1 << 30) -> None:
        self.images[image_id] = {
            "image_id": image_id,
            "kind": kind,
            "size": size,
            "user_data": {"vm": "web-1"},
            "created": "2026-12-06T13:00:00Z",
            "chain_depth": 1,
            "repo_id": "r1",
        }

    def script(self, repo_id: str, image_id: str, broken: bool) -> None:
        """The work on a new image, as the stream will tell it."""
        # As the engine says it: broken (no data yet, no error) while a host works on it.
        steps = [("broken", "1/2", -1), ("degraded", "1/2", 100), ("degraded", "2/2", 50)]
        with self.lock:
            for state, stage, percent in steps:
                self.events.append(event(repo_id, image_id, state, stage, percent))
            last = "broken" if broken else "optimized"
            error = "qemu-img convert failed: No space left on device" if broken else None
            self.events.append(event(repo_id, image_id, last, "2/2", 100, error))


def event(
    repo_id: str,
    image_id: str,
    status: str,
    stage: str,
    percent: int,
    last_error: str | None = None,
) -> dict[str, Any]:
    return {
        "repo_id": repo_id,
        "image_id": image_id,
        "status": status,
        "stage": stage,
        "percent_complete": percent,
        "host_id": "host-a",
        "last_error": last_error,
    }


def error(status: int, code: str, message: str, vdsm_code: int | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if vdsm_code is not None:
        body["vdsm_code"] = vdsm_code
    return JSONResponse(body, status_code=status)


def fake_api(d: FakeDaemon) -> FastAPI:
    api = FastAPI()

    def not_found(image_id: str) -> JSONResponse:
        return error(404, "image_not_found", f"no image {image_id} in r1", 201)

    @api.get("/repositories")
    def repositories() -> Any:
        return [{"repo_id": "r1", "format": "localfs-1.0", "images": len(d.images)}]

    @api.get("/repositories/{repo}")
    def describe(repo: str) -> Any:
        if repo != "r1":
            return error(404, "repository_not_connected", f"{repo} is not connected", 358)
        return {"repo_id": "r1", "format": "localfs-1.0", "images": len(d.images)}

    @api.get("/repositories/{repo}/images")
    def list_images(repo: str) -> Any:
        return list(d.images.values())

    @api.post("/repositories/{repo}/images", status_code=201)
    async def create(repo: str, request: Request) -> Any:
        body = await request.json()
        d.bodies.append(("create", body))
        if not isinstance(body.get("size"), int) or body["size"] <= 0:
            return error(422, "invalid_parameter", "size: a positive number of bytes", 100)
        new = str(uuid.uuid4())
        d.image(new, size=body["size"])
        d.script(repo, new, broken=bool((body.get("user_data") or {}).get("break")))
        return {"image_id": new}

    @api.post("/repositories/{repo}/images/{image_id}/snapshots", status_code=201)
    async def snapshot(repo: str, image_id: str, request: Request) -> Any:
        d.bodies.append(("snapshot", await request.json()))
        if image_id not in d.images:
            return not_found(image_id)
        new = str(uuid.uuid4())
        d.image(new, kind="snapshot")
        d.script(repo, new, broken=False)
        return {"image_id": new}

    @api.post("/repositories/{repo}/copies", status_code=201)
    async def copy(repo: str, request: Request) -> Any:
        body = await request.json()
        d.bodies.append(("copy", body))
        new = str(uuid.uuid4())
        d.image(new)
        d.script(repo, new, broken=False)
        return {"image_id": new}

    @api.get("/repositories/{repo}/images/{image_id}")
    def info(repo: str, image_id: str) -> Any:
        return d.images.get(image_id) or not_found(image_id)

    @api.get("/repositories/{repo}/images/{image_id}/status")
    def status(repo: str, image_id: str) -> Any:
        d.status_reads += 1
        if image_id not in d.images:
            return not_found(image_id)
        # Never optimized here: only the stream can tell a --wait that the work is done.
        status = event(repo, image_id, "broken", "1/2", -1)
        del status["repo_id"]
        return status

    @api.delete("/repositories/{repo}/images/{image_id}")
    def remove(repo: str, image_id: str) -> Any:
        if d.images.pop(image_id, None) is None:
            return not_found(image_id)
        return {}

    @api.post("/repositories/{repo}/images/{image_id}/resize")
    async def resize(repo: str, image_id: str, request: Request) -> Any:
        d.bodies.append(("resize", await request.json()))
        return {}

    @api.post("/repositories/{repo}/images/{image_id}/attach")
    def attach(repo: str, image_id: str) -> Any:
        return error(409, "image_in_use", f"{image_id} is attached on host-b", 40)

    @api.post("/repositories/{repo}/check")
    async def check(repo: str, request: Request) -> Any:
        d.bodies.append((f"/repositories/{repo}/check", await request.json()))
        d.checks += 1
        ids = sorted(d.images)
        return [
            {"type": "clean", "image_ids": ids[:1], "description": "a leftover volume",
             "data": f"check-{d.checks}-0"},
            {"type": "merge", "image_ids": ids[1:2], "description": "a chain too deep",
             "data": f"check-{d.checks}-1"},
            {"type": "clean", "image_ids": ids[2:3], "description": "an orphan",
             "data": f"check-{d.checks}-2"},
        ]  # fmt: skip

    @api.post("/repositories/{repo}/fixes")
    async def fix(repo: str, request: Request) -> Any:
        body = await request.json()
        d.applied.append(body["fix"])
        return {}

    @api.get("/events")
    async def events(request: Request) -> Any:
        if not d.events_available:
            return error(404, "not_found", "no such route")
        resume = request.headers.get("last-event-id")
        d.last_event_ids.append(resume)
        # Like a live stream: what happens from now on, or after the event the client last saw.
        start = len(d.events) if resume is None else int(resume.split(":")[1]) + 1

        async def stream() -> AsyncIterator[dict[str, str]]:
            for sent, seq in enumerate(itertools.count(start)):
                if sent == d.events_per_stream:
                    return
                while seq >= len(d.events):
                    await asyncio.sleep(0.01)
                yield {"id": f"r1:{seq}", "event": "status", "data": json.dumps(d.events[seq])}

        return EventSourceResponse(stream(), ping=1)

    return api


@contextmanager
def serving(app: FastAPI, **config: Any) -> Iterator[uvicorn.Server]:
    """``app`` served by uvicorn in a thread of the test, stopped when the test ends."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the fake did not start"
            time.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with tempfile.TemporaryDirectory(prefix="scli", dir="/tmp") as tmp:
        d = FakeDaemon(socket=f"{tmp}/s.sock")
        for n in range(3):
            d.image(f"00000000-0000-0000-0000-00000000000{n}")
        with serving(fake_api(d), uds=d.socket):
            yield d


@dataclass(frozen=True)
class Tls:
    url: str
    token_file: Path
    cacert: Path


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Tls]:
    """The fake on TCP with TLS (a self-signed certificate) and a bearer token."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    d = FakeDaemon(socket="")
    app = fake_api(d)

    @app.middleware("http")
    async def bearer(request: Request, call_next: Any) -> Any:
        if request.headers.get("authorization") != "Bearer s3cret":
            return error(401, "unauthorized", "a bearer token is required")
        return await call_next(request)

    config = {"host": "127.0.0.1", "port": 0, "ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with serving(app, **config) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Tls(f"https://127.0.0.1:{port}", token_file, cert)


# --- running the command line -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def strata(d: FakeDaemon | None, *args: str) -> Run:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("STRATA_URL", None)
    socket = ["--socket", d.socket] if d is not None else []
    done = subprocess.run(
        [sys.executable, "-m", "strata_server.cli", *socket, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    return Run(done.returncode, done.stdout, done.stderr)


DISK = "00000000-0000-0000-0000-000000000000"

# --- tests --------------------------------------------------------------------------------------


def test_lists_images_in_a_table_and_as_the_apis_json(fake: FakeDaemon) -> None:
    table = strata(fake, "image", "list", "r1")
    assert table.code == 0, table.err
    assert DISK in table.out and "virtual-disk" in table.out

    as_json = strata(fake, "--json", "image", "list", "r1")
    assert as_json.code == 0, as_json.err
    assert {i.image_id for i in Infos.validate_python(as_json.json())} == set(fake.images)


def test_info_and_status_print_the_fields_of_imageinfo_and_imagestatus(fake: FakeDaemon) -> None:
    info = ImageInfo.model_validate(strata(fake, "--json", "image", "info", "r1", DISK).json())
    assert info.image_id == DISK and info.user_data == {"vm": "web-1"}
    status = strata(fake, "--json", "image", "status", "r1", DISK)
    assert ImageStatus.model_validate(status.json()).status == "broken"
    people = strata(fake, "image", "info", "r1", DISK)
    assert people.code == 0 and "chain_depth" in people.out and "web-1" in people.out


@pytest.mark.parametrize(
    ("size", "size_bytes"),
    [("1G", 1 << 30), ("512M", 512 << 20), ("4096", 4096), ("2t", 2 << 40), ("64K", 64 << 10)],
)
def test_create_takes_a_size_in_bytes_or_with_a_unit(
    fake: FakeDaemon, size: str, size_bytes: int
) -> None:
    done = strata(fake, "--json", "image", "create", "r1", size)
    assert done.code == 0, done.err
    made = ImageId.model_validate(done.json())
    assert fake.images[made.image_id]["size"] == size_bytes
    assert fake.bodies[-1] == ("create", {"size": size_bytes, "user_data": None})


@pytest.mark.parametrize("size", ["1.5G", "-1", "12Q", "G", "", "1 G B"])
def test_a_size_that_is_not_a_size_is_a_usage_error(fake: FakeDaemon, size: str) -> None:
    done = strata(fake, "image", "create", "r1", size)
    assert done.code == 2
    assert "SIZE" in done.err
    assert fake.bodies == []  # nothing was asked of the daemon


def test_a_size_the_engine_refuses_is_its_typed_error(fake: FakeDaemon) -> None:
    done = strata(fake, "image", "create", "r1", "0")
    assert done.code == 1
    assert "invalid_parameter" in done.err


def test_create_passes_the_strategy_the_base_and_the_user_data(fake: FakeDaemon) -> None:
    done = strata(
        fake, "image", "create", "r1", "1G", "--strategy", "performance",
        "--base", DISK, "--user-data", '{"vm": "db-2"}',
    )  # fmt: skip
    assert done.code == 0, done.err
    assert fake.bodies[-1] == (
        "create",
        {
            "size": 1 << 30,
            "user_data": {"vm": "db-2"},
            "base_snapshot_id": DISK,
            "options": {"strategy": "performance"},
        },
    )
    assert done.out.strip() in fake.images  # the new id, alone on its line
    assert strata(fake, "image", "create", "r1", "1G", "--strategy", "fast").code == 2
    assert strata(fake, "image", "create", "r1", "1G", "--user-data", "{bad").code == 2


def test_a_typed_error_exits_1_with_its_code(fake: FakeDaemon) -> None:
    missing = "11111111-1111-1111-1111-111111111111"
    done = strata(fake, "image", "info", "r1", missing)
    assert done.code == 1
    assert "image_not_found" in done.err and missing in done.err
    assert done.out == ""

    as_json = strata(fake, "--json", "image", "remove", "r1", missing)
    assert as_json.code == 1
    assert Error.model_validate(as_json.json()) == Error(
        code="image_not_found", message=f"no image {missing} in r1", vdsm_code=201
    )

    in_use = strata(fake, "image", "attach", "r1", DISK)
    assert in_use.code == 1 and "image_in_use" in in_use.err


def test_usage_errors_exit_2(fake: FakeDaemon) -> None:
    assert strata(fake, "image", "frobnicate", "r1").code == 2
    assert strata(fake, "image", "info", "r1").code == 2  # IMAGE_ID missing
    assert strata(fake, "image", "wait", "r1", DISK, "--timeout", "soon").code == 2


def test_the_daemon_is_found_by_strata_socket_and_socket_or_url_not_both(
    fake: FakeDaemon,
) -> None:
    env = {**os.environ, "STRATA_SOCKET": fake.socket}
    by_env = subprocess.run(
        [sys.executable, "-m", "strata_server.cli", "--json", "repo", "list"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)[0]["repo_id"] == "r1"
    both = strata(fake, "--url", "https://localhost:8443", "repo", "list")
    assert both.code == 2 and "not both" in both.err


def test_over_tls_with_the_token_and_the_ca(tls: Tls, tmp_path: Path) -> None:
    url = ["--url", tls.url, "--cacert", str(tls.cacert)]
    done = strata(None, *url, "--token-file", str(tls.token_file), "--json", "repo", "list")
    assert done.code == 0, done.err
    assert done.json()[0]["repo_id"] == "r1"

    wrong = tmp_path / "wrong"
    wrong.write_text("guess")
    refused = strata(None, *url, "--token-file", str(wrong), "--json", "repo", "list")
    assert refused.code == 1
    assert Error.model_validate(refused.json()).code == "unauthorized"

    untrusted = strata(None, "--url", tls.url, "--token-file", str(tls.token_file), "repo", "list")
    assert untrusted.code == 1 and "server_unavailable" in untrusted.err


def test_a_daemon_that_is_not_there_is_a_typed_error(tmp_path: Path) -> None:
    done = strata(None, "--socket", "/tmp/strata-no-such.sock", "--json", "repo", "list")
    assert done.code == 1
    assert Error.model_validate(done.json()).code == "server_unavailable"


def test_check_numbers_the_fixes_from_1(fake: FakeDaemon) -> None:
    table = strata(fake, "check", "r1")
    assert table.code == 0, table.err
    lines = [line.split() for line in table.out.splitlines()]
    numbered = [cells[1] for cells in lines if len(cells) > 2 and cells[1] in {"1", "2", "3"}]
    assert numbered == ["1", "2", "3"]
    fixes = Fixes.validate_python(strata(fake, "--json", "check", "r1").json())
    assert [f.type for f in fixes] == ["clean", "merge", "clean"]


def test_check_deep_asks_for_the_deep_check(fake: FakeDaemon) -> None:
    assert strata(fake, "check", "r1").code == 0
    assert strata(fake, "check", "r1", "--deep").code == 0
    assert [body for path, body in fake.bodies if path.endswith("/check")] == [
        {},
        {"options": {"deep": True}},
    ]


def test_fix_2_runs_the_second_fix_of_a_fresh_check(fake: FakeDaemon) -> None:
    strata(fake, "check", "r1")
    done = strata(fake, "--json", "fix", "r1", "2")
    assert done.code == 0, done.err
    assert fake.checks == 2  # the fix numbers come from a check made now, not the last one
    assert [f["data"] for f in fake.applied] == ["check-2-1"]
    assert [f.type for f in Fixes.validate_python(done.json())] == ["merge"]


def test_fix_all_of_a_type_runs_only_those(fake: FakeDaemon) -> None:
    done = strata(fake, "fix", "r1", "--all", "--type", "clean")
    assert done.code == 0, done.err
    assert [f["data"] for f in fake.applied] == ["check-1-0", "check-1-2"]
    assert done.out.count("fixed: clean") == 2


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["fix", "r1"], 2),  # neither a number nor --all
        (["fix", "r1", "1", "--all"], 2),
        (["fix", "r1", "1", "--type", "clean"], 2),
        (["fix", "r1", "--all", "--type", "polish"], 2),
        (["fix", "r1", "0"], 2),
        (["fix", "r1", "4"], 1),  # the check offers three
    ],
    ids=["nothing", "both", "type-without-all", "unknown-type", "zero", "beyond"],
)
def test_fix_refuses_what_it_cannot_run(fake: FakeDaemon, args: list[str], code: int) -> None:
    done = strata(fake, *args)
    assert done.code == code, done.err
    assert fake.applied == []


def test_wait_shows_progress_from_the_stream_until_optimized(fake: FakeDaemon) -> None:
    done = strata(fake, "image", "create", "r1", "1G", "--wait")
    assert done.code == 0, done.err
    (new,) = set(fake.images) - {f"00000000-0000-0000-0000-00000000000{n}" for n in range(3)}
    assert done.out.strip() == new
    assert "optimized" in done.err and "100%" in done.err and new[:8] in done.err
    assert fake.status_reads == 1  # one read to start from; then the stream, no polling


def test_wait_resumes_a_stream_that_ends_with_last_event_id(fake: FakeDaemon) -> None:
    fake.events_per_stream = 3  # the work takes four events: the first stream misses the last
    done = strata(fake, "image", "create", "r1", "1G", "--wait")
    assert done.code == 0, done.err
    assert "optimized" in done.err
    first_event = len(fake.events) - 4
    assert fake.last_event_ids == [None, f"r1:{first_event + 2}"]


@pytest.mark.parametrize("verb", ["snapshot", "copy"])
def test_snapshot_and_copy_wait_too(fake: FakeDaemon, verb: str) -> None:
    done = strata(fake, "--json", "image", verb, "r1", DISK, "--wait")
    assert done.code == 0, done.err
    made = ImageId.model_validate(done.json())  # stdout holds only the JSON
    assert made.image_id in fake.images


def test_wait_ends_with_the_error_of_a_broken_image(fake: FakeDaemon) -> None:
    done = strata(fake, "image", "create", "r1", "1G", "--user-data", '{"break": true}', "--wait")
    assert done.code == 1
    assert "image_failed" in done.err and "No space left on device" in done.err


def test_wait_without_a_stream_is_a_clear_error_and_makes_nothing(fake: FakeDaemon) -> None:
    fake.events_available = False
    done = strata(fake, "--json", "image", "create", "r1", "1G", "--wait")
    assert done.code == 1
    assert Error.model_validate(done.json()).code == "events_unavailable"
    assert fake.bodies == []


# --- end to end: the real daemon, when this build has it ----------------------------------------


@dataclass(frozen=True)
class RealDaemon:
    socket: str
    root: Path


@pytest.fixture
def real() -> Iterator[RealDaemon]:
    """``strata serve`` started by ``strata`` itself, stopped by SIGTERM (killed if it lingers),
    with its storage daemon."""
    from engine.formats.qemu.storage_daemon import StorageDaemon

    with tempfile.TemporaryDirectory(prefix="scli", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "state").mkdir()
        (root / "repo").mkdir()
        config = root / "strata.toml"
        config.write_text(
            f'host_id = "host-a"\nstate_dir = "{root}/state"\nsocket = "{root}/s.sock"\n'
        )
        log = (root / "serve.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "strata_server.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while not (root / "s.sock").exists():
                assert proc.poll() is None, (root / "serve.log").read_text()
                assert time.monotonic() < deadline, "strata serve did not start"
                time.sleep(0.05)
            yield RealDaemon(str(root / "s.sock"), root)
        finally:
            proc.terminate()
            try:
                assert proc.wait(timeout=30) == 0, (root / "serve.log").read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
                StorageDaemon(str(root / "state")).stop()


def real_strata(d: RealDaemon, *args: str) -> Run:
    return strata(FakeDaemon(socket=d.socket), *args)


def test_strata_drives_the_real_daemon_end_to_end(real: RealDaemon) -> None:
    repo = str(real.root / "repo")
    assert real_strata(real, "repo", "create", "localfs-1.0", "--param", f"path={repo}").code == 0
    connected = real_strata(real, "repo", "connect", "r1", "localfs-1.0", "--param", f"path={repo}")
    assert connected.code == 0, connected.err
    listed = real_strata(real, "--json", "repo", "list")
    assert [r["repo_id"] for r in listed.json()] == ["r1"]

    made = real_strata(real, "--json", "image", "create", "r1", "1M", "--wait")
    assert made.code == 0, made.err
    disk = ImageId.model_validate(made.json()).image_id

    info = ImageInfo.model_validate(real_strata(real, "--json", "image", "info", "r1", disk).json())
    assert (info.size, info.kind) == (1 << 20, "virtual-disk")
    waited = real_strata(real, "--json", "image", "wait", "r1", disk, "--timeout", "60")
    assert ImageStatus.model_validate(waited.json()).status == "optimized", waited.out
    assert Fixes.validate_python(real_strata(real, "--json", "check", "r1").json()) == []
    deep = real_strata(real, "--json", "check", "r1", "--deep")  # a durable deep check
    assert deep.code == 0, deep.err
    assert Fixes.validate_python(deep.json()) == []

    missing = str(uuid.uuid4())
    refused = real_strata(real, "--json", "image", "info", "r1", missing)
    assert refused.code == 1
    assert Error.model_validate(refused.json()).code == "image_not_found"
    assert real_strata(real, "image", "create", "r1", "0").code == 1  # the engine's invalid size

    assert real_strata(real, "image", "remove", "r1", disk).code == 0
    assert real_strata(real, "--json", "image", "list", "r1").json() == []
