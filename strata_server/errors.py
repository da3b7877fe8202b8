"""From the engine's typed errors to HTTP answers (SPEC §9, docs/adr/0030).

Every answer that is not a success is JSON ``{"code", "message"}`` (plus ``vdsm_code`` and the
error's fields, :meth:`~engine.errors.StrataError.to_dict`), with a status that says what a
client can do about it: 404 the thing named is not there, 409 its state refuses the call now,
422 the request is wrong (FastAPI's own validation answers are rewritten to the same shape,
``name`` naming the field), 503 the storage refuses, 504 a wait ran out. Bad input never gets
500; only a bug in Strata does.

Imports: :mod:`engine.errors`; FastAPI and Starlette.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import StrataError

log = logging.getLogger(__name__)

# By code; a code not listed takes its base class's status (StorageFull -> StorageError -> 503).
STATUS_BY_CODE: dict[str, int] = {
    # 404: what the call names is not there
    "image_not_found": 404,
    "repository_not_connected": 404,
    "volume_file_not_found": 404,
    "not_a_repository": 404,
    # 409: the state of what it names refuses the call now
    "image_in_use": 409,
    "image_not_ready": 409,
    "wrong_image_kind": 409,
    "stale_fix": 409,
    "claim_lost": 409,
    "repository_busy": 409,
    "repository_already_connected": 409,
    "repository_not_empty": 409,
    "repository_already_formatted": 409,
    "repository_format_mismatch": 409,
    "volume_already_exists": 409,
    "volume_mismatch": 409,
    "volume_locked": 409,
    "foreign_file": 409,
    "concurrency_conflict": 409,
    "host_id_in_use": 409,
    "stage_cancelled": 409,
    "deep_check_unfinished": 409,
    "pivot_unknown": 409,
    "not_attached": 409,
    "replication_not_ready": 409,
    "replication_switch_failed": 409,
    "replication_error": 409,
    "unsupported_log_version": 409,
    # 422: the request itself is wrong
    "invalid_parameter": 422,
    "unknown_repository_format": 422,
    "not_supported": 422,
    # 503: the storage (or the machinery under it) refuses; retry when it is back
    "storage_error": 503,
    "storage_full": 503,
    "storage_read_only": 503,
    "permission_denied": 503,
    "log_error": 503,
    "log_corrupted": 503,
    "log_closed": 503,
    "log_missing": 503,
    "commit_unknown": 503,
    "not_a_strata_log": 503,
    "qemu_error": 503,
    "qemu_timeout": 503,
    "qemu_cancelled": 503,
    "daemon_error": 503,
    "executor_failed": 503,
    "engine_closed": 503,
    # 504: a wait ran out
    "wait_timeout": 504,
    # a bug
    "internal_error": 500,
}


def status_of(error: StrataError) -> int:
    """The HTTP status for ``error``: its own code's, else its nearest base class's, else 500."""
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in STATUS_BY_CODE:
            return STATUS_BY_CODE[code]
    return 500


def error_response(error: StrataError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=status_of(error))


def invalid(name: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"code": "invalid_parameter", "message": f"Invalid {name}: {message}", "name": name},
        status_code=422,
    )


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "fix", "image_ids", 0)`` -> ``fix.image_ids.0``; a body that is no JSON object
    at all (``("body",)`` or ``("body", 12)`` for bad JSON at offset 12) -> ``body``."""
    parts = list(loc)
    where = parts.pop(0) if parts and parts[0] in ("body", "query", "path", "header") else "body"
    if where == "body" and len(parts) == 1 and isinstance(parts[0], int):
        parts = []  # the offset of a JSON syntax error, not a field
    return ".".join(str(p) for p in parts) or where


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with the JSON shape above."""

    @app.exception_handler(StrataError)
    async def strata_error(request: Request, exc: StrataError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if not errors:
            return invalid("body", "the request could not be read")
        first = errors[0]
        name = field_name(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return invalid("body", f"not valid JSON ({first.get('msg', '')})")
        return invalid(name, str(first.get("msg", "wrong value")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            {"code": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed on an unexpected error", request.method, request.url.path)
        return JSONResponse(
            {
                "code": "internal_error",
                "message": f"{request.method} {request.url.path} failed on an unexpected error, "
                f"a bug in Strata: {exc!r}",
            },
            status_code=500,
        )
