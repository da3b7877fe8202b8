"""The API of ``strata serve`` through a real uvicorn on a Unix socket: every endpoint, with
real localfs repositories and real qemu-img.

Imports: :mod:`tests.server.conftest`; the standard library, pytest and httpx.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.server.conftest import Daemon, Place, wait_until, write_config

MiB = 1024 * 1024


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def running(daemon: Callable[..., Daemon], place: Place, create: bool = True) -> Daemon:
    """A daemon with repository ``r1`` connected from its config."""
    path = place.repo("r1")
    if create:
        d = daemon()
        ok(
            d.client().post(
                "/repositories",
                json={"format": "localfs-1.0", "connection_parameters": {"path": path}},
            ),
            201,
        )
        d.stop()
    return daemon(repositories=[{"id": "r1", "format": "localfs-1.0", "path": path}])


def position(c: httpx.Client, repo: str = "r1") -> int:
    return int(ok(c.get(f"/repositories/{repo}"))["log_position"])


def test_the_socket_is_made_0660_and_a_stale_one_replaced(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    first = daemon()
    first.kill()  # leaves its socket file behind
    assert os.path.exists(first.socket)
    second = daemon()
    assert stat.S_IMODE(os.stat(second.socket).st_mode) == 0o660
    assert ok(second.client().get("/health")) == {"host_id": "host-a"}


def test_a_second_daemon_does_not_take_the_socket_of_one_that_runs(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    first = daemon()
    config = place.root / "other.toml"
    write_config(config, host_id="host-b", state_dir=place.state_dir, socket=first.socket)
    second = subprocess.run(
        [sys.executable, "-m", "strata_server.serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "another process listens on this socket" in second.stderr
    assert ok(first.client().get("/health")) == {"host_id": "host-a"}


def test_a_disk_is_created_waited_for_snapshotted_copied_and_removed(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    d = running(daemon, place)
    c = d.client()
    assert [r["repo_id"] for r in ok(c.get("/repositories"))] == ["r1"]
    assert ok(c.get("/repositories/r1"))["images"] == 0

    disk = ok(
        c.post("/repositories/r1/images", json={"size": 4 * MiB, "user_data": {"vm": "a"}}), 201
    )["image_id"]
    status = ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    assert status["status"] == "optimized"
    assert ok(c.get(f"/repositories/r1/images/{disk}/status"))["image_id"] == disk

    info = ok(c.get(f"/repositories/r1/images/{disk}"))
    assert (info["kind"], info["size"], info["user_data"]) == ("virtual-disk", 4 * MiB, {"vm": "a"})

    ok(c.put(f"/repositories/r1/images/{disk}/user-data", json={"user_data": [1, 2]}))
    ok(c.post(f"/repositories/r1/images/{disk}/resize", json={"new_size": 8 * MiB}))
    ok(c.post(f"/repositories/r1/images/{disk}/wait", json={}))
    info = ok(c.get(f"/repositories/r1/images/{disk}"))
    assert (info["size"], info["user_data"]) == (8 * MiB, [1, 2])

    snap = ok(c.post(f"/repositories/r1/images/{disk}/snapshots"), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{snap}/wait"))
    copy = ok(c.post("/repositories/r1/copies", json={"image_id": snap}), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{copy}/wait", json={"timeout": 60}))
    listed = {i["image_id"]: i["kind"] for i in ok(c.get("/repositories/r1/images"))}
    assert listed == {disk: "virtual-disk", snap: "snapshot", copy: "snapshot"}

    chain = ok(c.get(f"/repositories/r1/images/{disk}/volumes"))
    assert chain and chain[-1]["path"].startswith(place.repo("r1"))
    by_path = ok(c.get("/images/by-path", params={"path": chain[-1]["path"]}))
    assert by_path["image_id"] == disk
    assert ok(c.get(f"/repositories/r1/images/{disk}/job")) is None

    ok(c.delete(f"/repositories/r1/images/{copy}"))
    assert ok(c.get(f"/repositories/r1/images/{copy}"), 404)["code"] == "image_not_found"


def test_a_disk_is_prepared_and_torn_down(daemon: Callable[..., Daemon], place: Place) -> None:
    c = running(daemon, place).client()
    disk = ok(c.post("/repositories/r1/images", json={"size": MiB}), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{disk}/wait"))
    prepared = ok(c.post(f"/repositories/r1/images/{disk}/prepare"))
    assert prepared["image_id"] == disk and os.path.exists(prepared["path"])
    assert prepared["readonly"] is False
    removing = c.delete(f"/repositories/r1/images/{disk}")
    assert ok(removing, 409)["code"] == "image_in_use"
    ok(c.post(f"/repositories/r1/images/{disk}/teardown"))
    ok(c.delete(f"/repositories/r1/images/{disk}"))


def test_stop_then_check_offers_a_mend_that_the_fix_endpoint_runs(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    c = running(daemon, place).client()
    new = {"size": MiB, "options": {"auto_fix": False}}
    disk = ok(c.post("/repositories/r1/images", json=new), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{disk}/stop", json={"reason": "host overloaded"}))
    status = ok(c.get(f"/repositories/r1/images/{disk}/status"))
    assert status["status"] == "broken" and "host overloaded" in status["last_error"]
    (mend,) = [f for f in ok(c.post("/repositories/r1/check")) if f["type"] == "mend"]
    assert mend["image_ids"] == [disk]
    ok(c.post("/repositories/r1/fixes", json={"fix": mend}))
    done = ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    assert done["status"] == "optimized"


def test_a_fix_that_no_longer_applies_is_409(daemon: Callable[..., Daemon], place: Place) -> None:
    c = running(daemon, place).client()
    new = {"size": MiB, "options": {"auto_fix": False}}
    disk = ok(c.post("/repositories/r1/images", json=new), 201)["image_id"]
    (mend,) = [f for f in ok(c.post("/repositories/r1/check")) if f["type"] == "mend"]
    ok(c.delete(f"/repositories/r1/images/{disk}"))
    assert ok(c.post("/repositories/r1/fixes", json={"fix": mend}), 409)["code"] == "stale_fix"


def test_a_removed_disk_s_volume_is_cleaned_through_the_api(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    c = running(daemon, place).client()
    disk = ok(c.post("/repositories/r1/images", json={"size": MiB}), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{disk}/wait"))
    ok(c.delete(f"/repositories/r1/images/{disk}"))
    cleans = [f for f in ok(c.post("/repositories/r1/check", json={})) if f["type"] == "clean"]
    assert cleans
    for fix in cleans:
        ok(c.post("/repositories/r1/fixes", json={"fix": fix}))
    volumes = os.path.join(place.repo("r1"), "volumes")
    wait_until(lambda: not os.listdir(volumes))
    wait_until(lambda: ok(c.post("/repositories/r1/check")) == [])


def test_a_repository_is_created_connected_disconnected_over_the_api(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    c = daemon().client()
    path = place.repo("r2")
    ok(
        c.post(
            "/repositories", json={"format": "localfs-1.0", "connection_parameters": {"path": path}}
        ),
        201,
    )
    again = c.post(
        "/repositories", json={"format": "localfs-1.0", "connection_parameters": {"path": path}}
    )
    assert ok(again, 409)["code"] == "repository_already_formatted"
    ok(
        c.post(
            "/repositories/r2/connect",
            json={"format": "localfs-1.0", "connection_parameters": {"path": path}},
        )
    )
    assert [r["repo_id"] for r in ok(c.get("/repositories"))] == ["r2"]
    ok(c.post("/repositories/r2/disconnect", json={"force": False}))
    assert ok(c.get("/repositories")) == []
    assert ok(c.get("/repositories/r2"), 404)["code"] == "repository_not_connected"
    unknown = c.post(
        "/repositories/r3/connect",
        json={"format": "nope-9", "connection_parameters": {"path": path}},
    )
    assert ok(unknown, 422)["code"] == "unknown_repository_format"


def test_errors_are_json_with_their_status(daemon: Callable[..., Daemon], place: Place) -> None:
    c = running(daemon, place).client()
    missing = "00000000-0000-4000-8000-000000000000"
    answer = ok(c.get(f"/repositories/r1/images/{missing}"), 404)
    assert answer["code"] == "image_not_found" and answer["vdsm_code"] == 13 and answer["message"]
    assert ok(c.get("/repositories/nope/images"), 404)["code"] == "repository_not_connected"
    negative = ok(c.post("/repositories/r1/images", json={"size": -1}), 422)
    assert (negative["code"], negative["name"]) == ("invalid_parameter", "size")
    disk = ok(c.post("/repositories/r1/images", json={"size": 64 * MiB}), 201)["image_id"]
    timeout = ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 0.001}), 504)
    assert timeout["code"] == "wait_timeout"
    assert ok(c.get("/no/such/route"), 404)["code"] == "not_found"


def test_bad_json_and_wrong_types_are_422_naming_the_field_and_append_nothing(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    c = running(daemon, place).client()
    before = position(c)
    bad_json = c.post(
        "/repositories/r1/images",
        content=b'{"size": ',
        headers={"content-type": "application/json"},
    )
    assert ok(bad_json, 422)["code"] == "invalid_parameter"
    assert bad_json.json()["name"] == "body"
    wrong_type = ok(c.post("/repositories/r1/images", json={"size": "big"}), 422)
    assert (wrong_type["code"], wrong_type["name"]) == ("invalid_parameter", "size")
    as_string = ok(c.post("/repositories/r1/images", json={"size": "1024"}), 422)
    assert as_string["name"] == "size"
    unknown_key = ok(c.post("/repositories/r1/images", json={"size": MiB, "colour": 1}), 422)
    assert unknown_key["name"] == "colour"
    not_an_object = ok(c.post("/repositories/r1/images", json=[1, 2]), 422)
    assert not_an_object["name"] == "body"
    nested = ok(
        c.post("/repositories/r1/fixes", json={"fix": {"type": "clean", "image_ids": "x"}}), 422
    )
    assert nested["name"].startswith("fix.")
    assert ok(c.get("/images/by-path"), 422)["name"] == "path"
    assert position(c) == before


def test_a_client_that_disconnects_mid_request_does_not_break_the_server(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    d = running(daemon, place)
    c = d.client()
    disk = ok(c.post("/repositories/r1/images", json={"size": MiB}), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    before = position(c)
    # One client goes away halfway through its body, another right after sending a whole
    # request, before the answer.
    half = socket.socket(socket.AF_UNIX)
    half.connect(d.socket)
    half.sendall(
        b"POST /repositories/r1/images HTTP/1.1\r\nhost: strata\r\n"
        b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"size": 10'
    )
    half.close()
    body = b'{"timeout": 5}'
    gone = socket.socket(socket.AF_UNIX)
    gone.connect(d.socket)
    gone.sendall(
        f"POST /repositories/r1/images/{disk}/wait HTTP/1.1\r\nhost: strata\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    gone.close()
    assert ok(c.get("/health"))["host_id"] == "host-a"
    status = ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    assert status["status"] == "optimized"
    assert position(c) == before
    assert d.proc is not None and d.proc.poll() is None


def test_openapi_lists_every_route(daemon: Callable[..., Daemon]) -> None:
    spec = ok(daemon().client().get("/openapi.json"))
    paths = spec["paths"]
    img = "/repositories/{repo}/images/{image_id}"
    expected = {
        "/health": {"get"},
        "/repositories": {"get", "post"},
        "/repositories/{repo}": {"get"},
        "/repositories/{repo}/connect": {"post"},
        "/repositories/{repo}/disconnect": {"post"},
        "/repositories/{repo}/images": {"get", "post"},
        "/repositories/{repo}/copies": {"post"},
        "/repositories/{repo}/check": {"post"},
        "/repositories/{repo}/fixes": {"post"},
        img: {"get", "delete"},
        img + "/snapshots": {"post"},
        img + "/user-data": {"put"},
        img + "/resize": {"post"},
        img + "/status": {"get"},
        img + "/wait": {"post"},
        img + "/stop": {"post"},
        img + "/prepare": {"post"},
        img + "/teardown": {"post"},
        img + "/attach": {"post"},
        img + "/detach": {"post"},
        img + "/volumes": {"get"},
        img + "/pull": {"post"},
        img + "/commit": {"post"},
        img + "/job": {"get"},
        img + "/job/bandwidth": {"put"},
        img + "/job/abort": {"post"},
        img + "/migrate": {"post"},
        img + "/clone-structure": {"post"},
        img + "/sync": {"post"},
        img + "/replicate-start": {"post"},
        img + "/replicate-finish": {"post"},
        "/attachments": {"get"},
        "/images/by-path": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    create = paths["/repositories/{repo}/images"]["post"]
    assert "requestBody" in create and "201" in create["responses"]
    assert "CreateDiskRequest" in spec["components"]["schemas"]


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="no qemu-storage-daemon")
def test_a_disk_is_attached_and_detached(daemon: Callable[..., Daemon], place: Place) -> None:
    c = running(daemon, place).client()
    disk = ok(c.post("/repositories/r1/images", json={"size": MiB}), 201)["image_id"]
    ok(c.post(f"/repositories/r1/images/{disk}/wait"))
    attachment = ok(c.post(f"/repositories/r1/images/{disk}/attach"))
    assert attachment["image_id"] == disk and attachment["nbd_uri"]
    assert [a["image_id"] for a in ok(c.get("/attachments"))] == [disk]
    ok(c.post(f"/repositories/r1/images/{disk}/detach"))
    assert ok(c.get("/attachments")) == []


def test_an_offline_pull_runs_as_a_block_job_and_a_commit_into_a_shared_volume_is_409(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    c = running(daemon, place).client()
    disk = ok(c.post("/repositories/r1/images", json={"size": MiB}), 201)["image_id"]
    for _ in range(2):
        snap = ok(c.post(f"/repositories/r1/images/{disk}/snapshots"), 201)["image_id"]
        ok(c.post(f"/repositories/r1/images/{snap}/wait", json={"timeout": 60}))
    ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    base, middle, top = [
        v["volume_id"] for v in ok(c.get(f"/repositories/r1/images/{disk}/volumes"))
    ]
    before = position(c)
    shared = c.post(
        f"/repositories/r1/images/{disk}/commit",
        json={"top_volume_id": middle, "base_volume_id": base},
    )
    assert ok(shared, 409)["code"] == "image_in_use"
    assert position(c) == before
    job_id = ok(c.post(f"/repositories/r1/images/{disk}/pull", json={}))["job_id"]
    assert job_id

    def ended() -> bool:
        job = ok(c.get(f"/repositories/r1/images/{disk}/job"))
        return job is not None and job["state"] in ("completed", "failed")

    wait_until(ended, timeout=60)
    job = ok(c.get(f"/repositories/r1/images/{disk}/job"))
    assert (job["kind"], job["state"]) == ("pull", "completed")
    ok(c.post(f"/repositories/r1/images/{disk}/wait", json={"timeout": 60}))
    assert [v["volume_id"] for v in ok(c.get(f"/repositories/r1/images/{disk}/volumes"))] == [top]
    # No job runs now: changing its bandwidth or aborting it is refused with a typed error.
    for refused in (
        c.put(f"/repositories/r1/images/{disk}/job/bandwidth", json={"bandwidth": MiB}),
        c.post(f"/repositories/r1/images/{disk}/job/abort", json={"pivot": False}),
    ):
        assert ok(refused, 409)["code"] == "stale_fix"
    assert (
        ok(c.put(f"/repositories/r1/images/{disk}/job/bandwidth", json={"bandwidth": "x"}), 422)[
            "name"
        ]
        == "bandwidth"
    )


def test_the_migration_verbs_answer_typed_errors(
    daemon: Callable[..., Daemon], place: Place
) -> None:
    c = running(daemon, place).client()
    missing = "/repositories/r1/images/00000000-0000-4000-8000-000000000000"
    for verb, body in (
        ("migrate", {"dst_repo_id": "r1"}),
        ("clone-structure", {"dst_repo_id": "r1"}),
        ("sync", {"dst_repo_id": "r1", "sync_type": "INTERNAL"}),
        ("replicate-start", {"dst_repo_id": "r1"}),
        ("replicate-finish", {"dst_repo_id": "r1"}),
    ):
        assert ok(c.post(f"{missing}/{verb}", json=body), 404)["code"] == "image_not_found", verb
        assert ok(c.post(f"{missing}/{verb}", json={}), 422)["name"] == "dst_repo_id", verb
    disk = ok(c.post("/repositories/r1/images", json={"size": MiB}), 201)["image_id"]
    nowhere = c.post(f"/repositories/r1/images/{disk}/migrate", json={"dst_repo_id": "r9"})
    assert ok(nowhere, 404)["code"] == "repository_not_connected"
