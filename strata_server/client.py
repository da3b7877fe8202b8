"""The HTTP client of ``strata serve``: JSON calls over its Unix socket or over TLS.

A JSON error response (``{"code", "message"}`` plus ``"vdsm_code"``) becomes a typed
:class:`ApiError`; so does a daemon that cannot be reached (code ``server_unavailable``), so that
the command line has one kind of error to print. :meth:`StrataClient.events` reads the server-sent
event stream (``GET /events``) line by line.

Imports: httpx; the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_SOCKET = "/run/strata/strata.sock"
# Requests that wait on the engine (``wait_for_image``) may take long; a hung daemon should not.
TIMEOUT = httpx.Timeout(30.0, read=None)


class ApiError(Exception):
    """What the daemon refused, by its stable ``code`` (``image_not_found``, ...)."""

    def __init__(
        self, code: str, message: str, vdsm_code: int | None = None, status: int = 0
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.vdsm_code = vdsm_code
        self.status = status  # the HTTP status, 0 when no response came

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.vdsm_code is not None:
            out["vdsm_code"] = self.vdsm_code
        return out


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket, or an ``https://`` URL with a bearer token."""

    socket: str | None = None
    url: str | None = None
    token: str | None = None
    cacert: str | None = None

    @classmethod
    def choose(
        cls,
        socket: str | None,
        url: str | None,
        token_file: str | None,
        cacert: str | None,
    ) -> Endpoint:
        if url is not None:
            token = Path(token_file).read_text().strip() if token_file else None
            return cls(url=url.rstrip("/"), token=token, cacert=cacert)
        return cls(socket=socket or os.environ.get("STRATA_SOCKET") or DEFAULT_SOCKET)

    def describe(self) -> str:
        return self.url if self.url is not None else f"unix socket {self.socket}"


def _error_from(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return ApiError(
            body["code"], str(body.get("message", "")), body.get("vdsm_code"), response.status_code
        )
    text = response.text.strip()[:200] or response.reason_phrase
    return ApiError(
        "http_error", f"HTTP {response.status_code}: {text}", None, response.status_code
    )


class StrataClient:
    """One connection pool to one daemon; use it as a context manager."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        headers = {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}
        if endpoint.url is not None:
            verify: Any = endpoint.cacert if endpoint.cacert else True
            self._http = httpx.Client(
                base_url=endpoint.url, headers=headers, verify=verify, timeout=TIMEOUT
            )
        else:
            transport = httpx.HTTPTransport(uds=endpoint.socket)
            self._http = httpx.Client(
                base_url="http://strata", transport=transport, timeout=TIMEOUT
            )

    def __enter__(self) -> StrataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _unreachable(self, e: httpx.TransportError) -> ApiError:
        return ApiError(
            "server_unavailable",
            f"cannot reach strata serve at {self.endpoint.describe()}: {e}",
        )

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        if response.is_error:
            raise _error_from(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise ApiError(
                "bad_response", f"{method} {path} answered with no JSON", None, response.status_code
            ) from e

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    @contextmanager
    def events(self, reconnects: int = 3) -> Iterator[Iterator[dict[str, Any]]]:
        """Open ``GET /events``; yields an iterator of each event's decoded ``data``.

        The stream is open (its headers read) when the context is entered, so a change made
        afterwards is seen; a stream that cannot be opened raises ``events_unavailable``. A
        stream that ends or breaks off (the daemon drops a slow client) is opened again with
        ``Last-Event-ID``, up to ``reconnects`` times, so no event is lost in between.
        """
        with ExitStack() as stack:
            lines = self._open_events(stack, None)
            yield self._event_data(stack, lines, reconnects)

    def _open_events(self, stack: ExitStack, last_event_id: str | None) -> Iterator[str]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        try:
            response = stack.enter_context(self._http.stream("GET", "/events", headers=headers))
        except httpx.TransportError as e:
            raise ApiError(
                "events_unavailable",
                f"cannot open the event stream of {self.endpoint.describe()}: {e}",
            ) from e
        if response.is_error:
            response.read()
            error = _error_from(response)
            raise ApiError(
                "events_unavailable",
                f"the event stream is unavailable ({error.code}: {error.message})",
                None,
                error.status,
            )
        return response.iter_lines()

    def _event_data(
        self, stack: ExitStack, lines: Iterator[str], reconnects: int
    ) -> Iterator[dict[str, Any]]:
        last_id: str | None = None
        while True:
            try:
                for event_id, data in _sse(lines):
                    last_id = event_id if event_id is not None else last_id
                    yield data
            except httpx.TransportError:
                pass  # broken off: resumed below like a stream that ended
            if reconnects == 0 or last_id is None:
                return
            reconnects -= 1
            lines = self._open_events(stack, last_id)


def _sse(lines: Iterator[str]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The server-sent events protocol: ``field: value`` lines, a blank line ends an event,
    ``:`` starts a comment (keep-alive pings). Yields each event's ``id`` (the last one seen, as
    the protocol says) and its ``data`` decoded from JSON."""
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if line == "":
            if data:
                payload = json.loads("\n".join(data))
                if isinstance(payload, dict):
                    yield event_id, payload
            data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            event_id = value
