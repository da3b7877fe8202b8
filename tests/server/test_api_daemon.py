"""``strata serve`` as a daemon: its config, TLS with a bearer token, SIGTERM and a restart, and
the mapping of every error code to an HTTP status.

Imports: :mod:`strata_server.config`, :mod:`strata_server.errors`, :mod:`engine.errors`,
:mod:`tests.server.conftest`; the standard library, pytest and httpx.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import engine.errors as errors_module
from engine.errors import StrataError
from strata_server.config import ConfigError, load_config
from strata_server.errors import STATUS_BY_CODE, status_of
from tests.server.conftest import Daemon, Place, wait_until

MiB = 1024 * 1024


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the config -----------------------------------------------------------------------------------


def test_a_config_is_read_with_its_repositories_in_order(tmp_path: Path) -> None:
    path = tmp_path / "strata.toml"
    path.write_text(
        'host_id = "host-a"\nstate_dir = "/s"\nsocket = "/s.sock"\nlease_timeout = 30\n'
        '[[repositories]]\nid = "r2"\nformat = "localfs-1.0"\npath = "/srv/2"\n'
        '[[repositories]]\nid = "r1"\nformat = "localfs-1.0"\npath = "/srv/1"\n'
        '[tcp]\nlisten = "0.0.0.0:8443"\ncertfile = "c"\nkeyfile = "k"\ntoken_file = "t"\n'
    )
    config = load_config(path)
    assert (config.host_id, config.state_dir, config.lease_timeout) == ("host-a", "/s", 30.0)
    assert [(r.id, r.connection_parameters) for r in config.repositories] == [
        ("r2", {"path": "/srv/2"}),
        ("r1", {"path": "/srv/1"}),
    ]
    assert config.tcp is not None and (config.tcp.host, config.tcp.port) == ("0.0.0.0", 8443)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("host_id = ", "not valid TOML"),
        ('state_dir = "/s"\nsocket = "/x"', "missing key host_id"),
        ('host_id = 3\nstate_dir = "/s"\nsocket = "/x"', "host_id must be a non-empty string"),
        ('host_id = "a"\nstate_dir = "/s"\nsocket = "/x"\nport = 1', "unknown key(s) ['port']"),
        ('host_id = "a"\nstate_dir = "/s"\nsocket = "/x"\nlease_timeout = "x"', "lease_timeout"),
        ('host_id = "a"\nstate_dir = "/s"\nsocket = "/x"\n[[repositories]]\nid = "r"', "format"),
        (
            'host_id = "a"\nstate_dir = "/s"\nsocket = "/x"\n[tcp]\nlisten = "nope"\n'
            'certfile = "c"\nkeyfile = "k"\ntoken_file = "t"',
            "tcp.listen must be HOST:PORT",
        ),
    ],
    ids=["toml", "missing", "type", "unknown", "lease", "repo-format", "listen"],
)
def test_a_bad_config_is_a_typed_error_saying_what_is_wrong(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "strata.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert says in str(caught.value) and str(path) in str(caught.value)


def test_strata_serve_refuses_a_bad_config_with_exit_status_1(tmp_path: Path) -> None:
    path = tmp_path / "strata.toml"
    path.write_text('host_id = "a"\n')
    done = subprocess.run(
        [sys.executable, "-m", "strata_server.serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "invalid_config" in done.stderr and "missing key state_dir" in done.stderr


# --- the error mapping ----------------------------------------------------------------------------


def every_error_class() -> list[type[StrataError]]:
    """Every error the engine may raise; ``tool_failed`` is strata-log's own, never the engine's."""
    return [
        cls
        for _, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, StrataError) and cls is not StrataError and cls.code != "tool_failed"
    ]


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.code)
def test_every_error_code_has_a_fitting_status(cls: type[StrataError]) -> None:
    assert cls.code in STATUS_BY_CODE, f"{cls.code} has no HTTP status"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors_module.ImageNotFound("", image_id="x"), 404),
        (errors_module.RepositoryNotConnected(repo_id="r"), 404),
        (errors_module.ImageInUse("prepared", image_id="x"), 409),
        (errors_module.ClaimLost("moved", image_id="x", stage=1), 409),
        (errors_module.ReplicationNotReady("later", image_id="x"), 409),
        (errors_module.InvalidParameter("bad", name="size"), 422),
        (errors_module.StorageFull("", doing="writing", path="/p", errno=28), 503),
        (errors_module.StorageReadOnly("", doing="writing", path="/p", errno=30), 503),
        (errors_module.PermissionDenied("", doing="writing", path="/p", errno=13), 503),
        (errors_module.WaitTimeout("", image_id="x", timeout=1.0), 504),
        (errors_module.InternalError("bug", doing="x"), 500),
    ],
    ids=lambda v: v.code if isinstance(v, StrataError) else str(v),
)
def test_an_error_maps_to_its_status(error: StrataError, status: int) -> None:
    assert status_of(error) == status


# --- TLS and the bearer token ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
def test_tcp_needs_tls_and_the_bearer_token(daemon: Callable[..., Daemon], place: Place) -> None:
    cert, key, token_file = place.root / "cert.pem", place.root / "key.pem", place.root / "token"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    token_file.write_text("s3cret-token\n")
    port = free_port()
    d = daemon(
        tcp={
            "listen": f"127.0.0.1:{port}",
            "certfile": str(cert),
            "keyfile": str(key),
            "token_file": str(token_file),
        }
    )
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    with httpx.Client(base_url=url, verify=trusted, timeout=30) as c:
        wait_until(lambda: _answers(c))
        for path in ("/health", "/openapi.json", "/repositories"):
            refused = ok(c.get(path), 401)
            assert refused["code"] == "unauthorized"
            wrong = c.get(path, headers={"Authorization": "Bearer s3cret-tokeN"})
            assert ok(wrong, 401)["code"] == "unauthorized"
        before = ok(d.client().get("/repositories"))
        creating = c.post(
            "/repositories",
            json={"format": "localfs-1.0", "connection_parameters": {"path": place.repo("t")}},
        )
        assert creating.status_code == 401
        assert list(Path(place.repo("t")).iterdir()) == []
        right = {"Authorization": "Bearer s3cret-token"}
        assert ok(c.get("/health", headers=right)) == {"host_id": "host-a"}
        assert "/health" in ok(c.get("/openapi.json", headers=right))["paths"]
        assert ok(c.get("/repositories", headers=right)) == before
    # Plain HTTP on the TLS port gets no answer from the API.
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as plain,
        pytest.raises(httpx.HTTPError),
    ):
        plain.get("/health", headers=right).raise_for_status()


def _answers(c: httpx.Client) -> bool:
    try:
        c.get("/health")
    except httpx.TransportError:
        return False
    return True


# --- SIGTERM and a restart ------------------------------------------------------------------------


def running_stage(c: httpx.Client, image_id: str) -> bool:
    """Whether a stage of ``image_id`` is claimed and has not finished."""
    status = ok(c.get(f"/repositories/r1/images/{image_id}/status"))
    assert status["status"] != "optimized", "the copy finished before the daemon was stopped"
    return bool(status["host_id"] == "host-a" and status["percent_complete"] >= 0)


def test_sigterm_while_a_stage_runs_exits_0_and_a_restart_finishes_the_work(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    path = place.repo("r1")
    first = daemon()
    c = first.client()
    ok(
        c.post(
            "/repositories", json={"format": "localfs-1.0", "connection_parameters": {"path": path}}
        ),
        201,
    )
    ok(
        c.post(
            "/repositories/r1/connect",
            json={"format": "localfs-1.0", "connection_parameters": {"path": path}},
        )
    )
    disk = ok(c.post("/repositories/r1/images", json={"size": 256 * MiB}), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    prepared = ok(c.post(f"/repositories/r1/images/{disk}/prepare"))
    subprocess.run(
        ["qemu-io", "-f", prepared["format"], "-c", "write -P 0x5a 0 192M", prepared["path"]],
        check=True,
        capture_output=True,
        timeout=120,
    )
    ok(c.post(f"/repositories/r1/images/{disk}/teardown"))
    snap = ok(c.post(f"/repositories/r1/images/{disk}/snapshots"), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{snap}/wait", json={"timeout": 60}))
    copy = ok(c.post("/repositories/r1/copies", json={"image_id": snap}), 201)["image_id"]
    wait_until(lambda: running_stage(c, copy), timeout=30)

    assert first.stop(signal.SIGTERM) == 0
    assert "Traceback" not in first.logs()
    assert not Path(first.socket).exists()

    second = daemon(repositories=[{"id": "r1", "format": "localfs-1.0", "path": path}])
    c = second.client()
    done = ok(c.post(f"/repositories/r1/images/{copy}/wait", json={"timeout": 120}))
    assert done["status"] == "optimized"
    chain = ok(c.get(f"/repositories/r1/images/{copy}/volumes"))
    source = ok(c.get(f"/repositories/r1/images/{snap}/volumes"))
    compared = subprocess.run(
        ["qemu-img", "compare", source[-1]["path"], chain[-1]["path"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_sigterm_ends_open_event_streams_and_exits_0_at_once(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon()
    assert "/events" in ok(d.client().get("/openapi.json"))["paths"]
    ended = threading.Event()

    def follow() -> None:
        with contextlib.suppress(httpx.HTTPError), d.client().stream("GET", "/events") as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass
        ended.set()

    reader = threading.Thread(target=follow)
    reader.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 4  # not the 5 s a request in flight is given
    reader.join(10)
    assert ended.is_set()
