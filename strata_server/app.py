"""The HTTP/JSON API of ``strata serve``: one endpoint per facade method (SPEC §9, docs/adr/0030).

The facade blocks, so every endpoint is a plain ``def``: FastAPI runs it in its threadpool and
the event loop stays free for other requests and the event stream. Requests and answers are
pydantic models, so ``GET /openapi.json`` describes them and a wrong type is refused (422, the
field named) before the engine is called, so that a bad request appends nothing. Given a token,
every request (``/openapi.json`` included) needs ``Authorization: Bearer <token>``.

Imports: :mod:`engine` (``StorageEngine``), :mod:`engine.errors`, :mod:`engine.types`,
:mod:`strata_server.errors`, and :mod:`strata_server.events` when it is there; FastAPI, pydantic,
Starlette and the standard library.
"""

from __future__ import annotations

import hmac
import importlib
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.errors import RepositoryNotConnected
from engine.types import Fix
from strata_server.errors import install_error_handlers

if TYPE_CHECKING:
    from engine import StorageEngine


class RequestBody(BaseModel):
    # Strict: "10" is not a size, and a key the endpoint does not know is a mistake to report.
    model_config = ConfigDict(strict=True, extra="forbid")


class Answer(BaseModel):
    pass


# --- requests -----------------------------------------------------------------------------------


class CreateRepositoryRequest(RequestBody):
    format: str
    connection_parameters: dict[str, Any]


class ConnectRepositoryRequest(RequestBody):
    format: str
    connection_parameters: dict[str, Any] | None = None


class DisconnectRepositoryRequest(RequestBody):
    force: bool = False


class CreateDiskRequest(RequestBody):
    size: int
    base_snapshot_id: str | None = None
    user_data: Any = None
    options: dict[str, Any] | None = None


class CreateSnapshotRequest(RequestBody):
    user_data: Any = None
    options: dict[str, Any] | None = None


class CopyImageRequest(RequestBody):
    image_id: str
    base_image_id: str | None = None
    user_data: Any = None
    options: dict[str, Any] | None = None


class SetUserDataRequest(RequestBody):
    user_data: Any


class ResizeRequest(RequestBody):
    new_size: int


class WaitRequest(RequestBody):
    timeout: float | None = None


class CheckRequest(RequestBody):
    options: dict[str, Any] | None = None


class FixModel(RequestBody):
    """A fix exactly as ``POST /repositories/{repo}/check`` returned it."""

    type: str
    image_ids: list[str]
    description: str
    data: str


class FixRequest(RequestBody):
    fix: FixModel
    options: dict[str, Any] | None = None


class StopRequest(RequestBody):
    reason: str = ""


class PullRequest(RequestBody):
    base_volume_id: str | None = None
    bandwidth: int | None = None


class CommitRequest(RequestBody):
    top_volume_id: str
    base_volume_id: str
    bandwidth: int | None = None


class BandwidthRequest(RequestBody):
    bandwidth: int


class AbortRequest(RequestBody):
    pivot: bool = False


class DestinationRequest(RequestBody):
    dst_repo_id: str


class SyncRequest(RequestBody):
    dst_repo_id: str
    sync_type: str


# --- answers ------------------------------------------------------------------------------------


class Empty(Answer):
    pass


class Health(Answer):
    host_id: str


class ImageIdAnswer(Answer):
    image_id: str


class JobIdAnswer(Answer):
    job_id: str


class ImageInfoModel(Answer):
    image_id: str
    kind: str
    size: int
    user_data: Any
    created: str
    chain_depth: int
    repo_id: str


class ImageStatusModel(Answer):
    image_id: str
    status: str
    host_id: str | None
    stage: str
    percent_complete: int
    last_error: str | None


class FixAnswer(Answer):
    type: str
    image_ids: list[str]
    description: str
    data: str


class PreparedImageModel(Answer):
    image_id: str
    path: str
    format: str
    readonly: bool


class AttachmentModel(Answer):
    image_id: str
    repo_id: str
    nbd_uri: str
    readonly: bool


class VolumeModel(Answer):
    volume_id: str
    format: str
    path: str
    size: int
    shared: bool


class BlockJobModel(Answer):
    job_id: str
    kind: str
    cur: int
    end: int
    bandwidth: int
    state: str
    error: str | None


class ErrorModel(Answer):
    code: str
    message: str
    vdsm_code: int | None = None
    name: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorModel, "description": what}
    for status, what in (
        (404, "Not found: the repository or image named is not there"),
        (409, "Conflict: the image or repository's state refuses the call now"),
        (422, "Invalid: a parameter is wrong (its name in `name`)"),
        (503, "The storage is unavailable (full, read-only, permission denied)"),
        (504, "A wait ran out"),
    )
}


class ConnectedNames:
    """The repositories this daemon connected, in order: the facade has no call that lists them."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._names = dict.fromkeys(names)

    def add(self, name: str) -> None:
        with self._lock:
            self._names[name] = None

    def discard(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    def __iter__(self) -> Any:
        with self._lock:
            return iter(list(self._names))


class BearerToken:
    """Refuses (401, nothing else touched) a request without ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                answer = JSONResponse(
                    {"code": "unauthorized", "message": "a valid bearer token is required"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(
    engine: StorageEngine, token: str | None = None, connected: ConnectedNames | None = None
) -> FastAPI:
    """The API over ``engine``; with ``token``, every request must carry it as a bearer token.

    ``connected`` names the repositories already connected (``GET /repositories`` lists them);
    two apps over one engine (the socket's and TCP's) share it.
    """
    app = FastAPI(
        title="Strata",
        summary="The storage API of one host (strata serve)",
        version="1",
        responses=ERRORS,
    )
    install_error_handlers(app)
    app.include_router(_routes(engine, connected if connected is not None else ConnectedNames()))
    events = _events_router(engine)
    if events is not None:
        app.include_router(events)
    if token is not None:
        app.add_middleware(BearerToken, token=token)
    return app


def _events_router(engine: StorageEngine) -> APIRouter | None:
    try:
        events = importlib.import_module("strata_server.events")
    except ModuleNotFoundError as e:
        if e.name != "strata_server.events":
            raise
        return None
    router: APIRouter = events.events_router(engine)
    return router


def _routes(engine: StorageEngine, connected: ConnectedNames) -> APIRouter:
    r = APIRouter()
    img = "/repositories/{repo}/images/{image_id}"

    # --- the host and its repositories ----------------------------------------------------------

    @r.get("/health", tags=["host"])
    def health() -> Health:
        return Health(host_id=engine.host_id)

    @r.get("/repositories", tags=["repositories"])
    def list_repositories() -> list[dict[str, Any]]:
        described = []
        for name in connected:
            try:
                described.append(engine.describe_repository(name))
            except RepositoryNotConnected:
                connected.discard(name)
        return described

    @r.post("/repositories", status_code=201, tags=["repositories"])
    def create_repository(body: CreateRepositoryRequest) -> Empty:
        engine.create_storage_repository(body.format, body.connection_parameters)
        return Empty()

    @r.post("/repositories/{repo}/connect", tags=["repositories"])
    def connect_repository(repo: str, body: ConnectRepositoryRequest) -> Empty:
        engine.connect_storage_repository(repo, body.format, body.connection_parameters)
        connected.add(repo)
        return Empty()

    @r.post("/repositories/{repo}/disconnect", tags=["repositories"])
    def disconnect_repository(repo: str, body: DisconnectRepositoryRequest | None = None) -> Empty:
        engine.disconnect_storage_repository(repo, force=body.force if body else False)
        connected.discard(repo)
        return Empty()

    @r.get("/repositories/{repo}", tags=["repositories"])
    def describe_repository(repo: str) -> dict[str, Any]:
        return engine.describe_repository(repo)

    @r.post("/repositories/{repo}/check", tags=["checks"])
    def check_repository(repo: str, body: CheckRequest | None = None) -> list[FixAnswer]:
        fixes = engine.check_storage_repository(repo, body.options if body else None)
        return [FixAnswer(**f.to_dict()) for f in fixes]

    @r.post("/repositories/{repo}/fixes", tags=["checks"])
    def fix_repository(repo: str, body: FixRequest) -> Empty:
        f = body.fix
        fix = Fix(type=f.type, image_ids=tuple(f.image_ids), description=f.description, data=f.data)
        engine.fix_storage_repository(repo, fix, body.options)
        return Empty()

    # --- images ---------------------------------------------------------------------------------

    @r.get("/repositories/{repo}/images", tags=["images"])
    def list_images(repo: str) -> list[ImageInfoModel]:
        return [ImageInfoModel(**i.to_dict()) for i in engine.list_images(repo)]

    @r.post("/repositories/{repo}/images", status_code=201, tags=["images"])
    def create_virtual_disk(repo: str, body: CreateDiskRequest) -> ImageIdAnswer:
        new_id = engine.create_virtual_disk(
            repo, body.size, body.base_snapshot_id, body.user_data, body.options
        )
        return ImageIdAnswer(image_id=new_id)

    @r.post(img + "/snapshots", status_code=201, tags=["images"])
    def create_snapshot(
        repo: str, image_id: str, body: CreateSnapshotRequest | None = None
    ) -> ImageIdAnswer:
        b = body or CreateSnapshotRequest()
        new_id = engine.create_snapshot(repo, image_id, b.user_data, b.options)
        return ImageIdAnswer(image_id=new_id)

    @r.post("/repositories/{repo}/copies", status_code=201, tags=["images"])
    def copy_image(repo: str, body: CopyImageRequest) -> ImageIdAnswer:
        new_id = engine.copy_image(
            repo, body.image_id, body.base_image_id, body.user_data, body.options
        )
        return ImageIdAnswer(image_id=new_id)

    @r.delete(img, tags=["images"])
    def remove_image(repo: str, image_id: str) -> Empty:
        engine.remove_image(repo, image_id)
        return Empty()

    @r.get(img, tags=["images"])
    def get_image_info(repo: str, image_id: str) -> ImageInfoModel:
        return ImageInfoModel(**engine.get_image_info(repo, image_id).to_dict())

    @r.put(img + "/user-data", tags=["images"])
    def set_user_data(repo: str, image_id: str, body: SetUserDataRequest) -> Empty:
        engine.set_user_data(repo, image_id, body.user_data)
        return Empty()

    @r.post(img + "/resize", tags=["images"])
    def resize_virtual_disk(repo: str, image_id: str, body: ResizeRequest) -> Empty:
        engine.resize_virtual_disk(repo, image_id, body.new_size)
        return Empty()

    @r.get(img + "/status", tags=["images"])
    def get_image_status(repo: str, image_id: str) -> ImageStatusModel:
        return ImageStatusModel(**engine.get_image_status(repo, image_id).to_dict())

    @r.post(img + "/wait", tags=["images"])
    def wait_for_image(
        repo: str, image_id: str, body: WaitRequest | None = None
    ) -> ImageStatusModel:
        status = engine.wait_for_image(repo, image_id, body.timeout if body else None)
        return ImageStatusModel(**status.to_dict())

    @r.post(img + "/stop", tags=["checks"])
    def stop_fix(repo: str, image_id: str, body: StopRequest | None = None) -> Empty:
        engine.stop_fix(repo, image_id, body.reason if body else "")
        return Empty()

    @r.get("/images/by-path", tags=["images"])
    def lookup_image_by_path(path: str = Query(min_length=1)) -> ImageInfoModel:
        return ImageInfoModel(**engine.lookup_image_by_path(path).to_dict())

    # --- virtual machines -----------------------------------------------------------------------

    @r.post(img + "/prepare", tags=["virtual machines"])
    def prepare_image(repo: str, image_id: str) -> PreparedImageModel:
        return PreparedImageModel(**engine.prepare_image(repo, image_id).to_dict())

    @r.post(img + "/teardown", tags=["virtual machines"])
    def teardown_image(repo: str, image_id: str) -> Empty:
        engine.teardown_image(repo, image_id)
        return Empty()

    @r.post(img + "/attach", tags=["virtual machines"])
    def attach_image(repo: str, image_id: str) -> AttachmentModel:
        return AttachmentModel(**engine.attach_image(repo, image_id).to_dict())

    @r.post(img + "/detach", tags=["virtual machines"])
    def detach_image(repo: str, image_id: str) -> Empty:
        engine.detach_image(repo, image_id)
        return Empty()

    @r.get("/attachments", tags=["virtual machines"])
    def list_attachments() -> list[AttachmentModel]:
        return [AttachmentModel(**a.to_dict()) for a in engine.list_attachments()]

    # --- block jobs and live storage migration --------------------------------------------------

    @r.get(img + "/volumes", tags=["block jobs"])
    def get_volume_chain(repo: str, image_id: str) -> list[VolumeModel]:
        return [VolumeModel(**v.to_dict()) for v in engine.get_volume_chain(repo, image_id)]

    @r.post(img + "/pull", tags=["block jobs"])
    def block_pull(repo: str, image_id: str, body: PullRequest | None = None) -> JobIdAnswer:
        b = body or PullRequest()
        return JobIdAnswer(job_id=engine.block_pull(repo, image_id, b.base_volume_id, b.bandwidth))

    @r.post(img + "/commit", tags=["block jobs"])
    def block_commit(repo: str, image_id: str, body: CommitRequest) -> JobIdAnswer:
        job = engine.block_commit(
            repo, image_id, body.top_volume_id, body.base_volume_id, body.bandwidth
        )
        return JobIdAnswer(job_id=job)

    @r.get(img + "/job", tags=["block jobs"])
    def get_block_job(repo: str, image_id: str) -> BlockJobModel | None:
        job = engine.get_block_job(repo, image_id)
        return None if job is None else BlockJobModel(**job.to_dict())

    @r.put(img + "/job/bandwidth", tags=["block jobs"])
    def set_block_job_bandwidth(repo: str, image_id: str, body: BandwidthRequest) -> Empty:
        engine.set_block_job_bandwidth(repo, image_id, body.bandwidth)
        return Empty()

    @r.post(img + "/job/abort", tags=["block jobs"])
    def abort_block_job(repo: str, image_id: str, body: AbortRequest | None = None) -> Empty:
        engine.abort_block_job(repo, image_id, body.pivot if body else False)
        return Empty()

    @r.post(img + "/migrate", tags=["migration"])
    def migrate_image(repo: str, image_id: str, body: DestinationRequest) -> JobIdAnswer:
        return JobIdAnswer(job_id=engine.migrate_image(repo, image_id, body.dst_repo_id))

    @r.post(img + "/clone-structure", tags=["migration"])
    def clone_image_structure(repo: str, image_id: str, body: DestinationRequest) -> JobIdAnswer:
        return JobIdAnswer(job_id=engine.clone_image_structure(repo, image_id, body.dst_repo_id))

    @r.post(img + "/sync", tags=["migration"])
    def sync_image_data(repo: str, image_id: str, body: SyncRequest) -> JobIdAnswer:
        job = engine.sync_image_data(repo, image_id, body.dst_repo_id, body.sync_type)
        return JobIdAnswer(job_id=job)

    @r.post(img + "/replicate-start", tags=["migration"])
    def disk_replicate_start(repo: str, image_id: str, body: DestinationRequest) -> Empty:
        engine.disk_replicate_start(repo, image_id, body.dst_repo_id)
        return Empty()

    @r.post(img + "/replicate-finish", tags=["migration"])
    def disk_replicate_finish(repo: str, image_id: str, body: DestinationRequest) -> Empty:
        engine.disk_replicate_finish(repo, image_id, body.dst_repo_id)
        return Empty()

    return r
