"""``strata serve --config FILE``: the host daemon (SPEC §9, docs/adr/0030).

One :class:`~engine.StorageEngine` with its executors, the repositories the config names
connected in order, and the API (:mod:`strata_server.app`) served by uvicorn on the Unix socket
(created 0660: its permissions are the access control) and, with ``[tcp]``, by a second uvicorn
server with TLS and a bearer token, both in one asyncio loop. SIGTERM or SIGINT stops both
servers, then the engine (its executors stop; attached images stay served by the storage
daemon), and the process exits 0.

Imports: :mod:`engine` (``StorageEngine``), :mod:`engine.errors`, :mod:`strata_server.app`,
:mod:`strata_server.config`; uvicorn and the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from engine import StorageEngine
from engine.errors import StrataError
from strata_server.app import ConnectedNames, make_app
from strata_server.config import ConfigError, ServerConfig, load_config

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
# Seconds a stop waits for requests in flight before it cancels them.
GRACEFUL_SHUTDOWN = 5


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: this module's loop stops both servers
    and exits 0, where uvicorn would re-raise the signal and die of it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(config_path: str | Path) -> int:
    """Run the daemon the config at ``config_path`` describes until SIGTERM or SIGINT."""
    config = load_config(config_path)
    token = _token(config)
    # Bound first, so that a second daemon on this socket fails before it starts an engine;
    # clients that connect meanwhile wait in the backlog until the repositories are connected.
    listening = unix_socket(config.socket)
    try:
        engine = StorageEngine(
            config.host_id, state_dir=config.state_dir, lease_timeout=config.lease_timeout
        )
        try:
            for repo in config.repositories:
                engine.connect_storage_repository(repo.id, repo.format, repo.connection_parameters)
                log.info(
                    "host %s connected repository %s (%s)", config.host_id, repo.id, repo.format
                )
            connected = ConnectedNames(r.id for r in config.repositories)
            asyncio.run(_serve(engine, config, token, connected, listening))
        finally:
            log.info("host %s stopping its engine", config.host_id)
            engine.close()
    finally:
        listening.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.socket)
    return 0


def _token(config: ServerConfig) -> str | None:
    if config.tcp is None:
        return None
    try:
        token = config.tcp.token()
    except OSError as e:
        raise ConfigError(config.tcp.token_file, f"cannot read the token: {e.strerror}") from e
    if not token:
        raise ConfigError(config.tcp.token_file, "the token file is empty")
    return token


async def _serve(
    engine: StorageEngine,
    config: ServerConfig,
    token: str | None,
    connected: ConnectedNames,
    listening: socket.socket,
) -> None:
    unix_app = make_app(engine, None, connected)
    servers = [_Server(_uvicorn_config(unix_app))]
    sockets = [[listening]]
    if config.tcp is not None:
        tcp_app = make_app(engine, token, connected)
        tls = _uvicorn_config(
            tcp_app,
            host=config.tcp.host,
            port=config.tcp.port,
            ssl_certfile=config.tcp.certfile,
            ssl_keyfile=config.tcp.keyfile,
        )
        servers.append(_Server(tls))
        sockets.append([])

    def stop(signum: int) -> None:
        log.info("host %s got %s: stopping", config.host_id, signal.Signals(signum).name)
        for server in servers:
            # uvicorn's own handler (which sse-starlette wraps to end the event streams at
            # once): it sets should_exit, and force_exit on a second SIGINT.
            server.handle_exit(signum, None)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    await asyncio.gather(
        *(s.serve(sockets=socks or None) for s, socks in zip(servers, sockets, strict=True))
    )


def _uvicorn_config(app: object, **kwargs: object) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_config=None,  # the daemon's logging is configured once, in main()
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        lifespan="off",
        **kwargs,  # type: ignore[arg-type]
    )


def unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0660, replacing a stale socket there (not
    any other file, and not the socket of a daemon that still answers)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if _answers(path):
                raise OSError(errno.EADDRINUSE, "another process listens on this socket", path)
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # never more open than 0660, not even for a moment
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata serve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the daemon's TOML config file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return serve(args.config)
    except ConfigError as e:
        print(f"strata serve: invalid_config: {e}", file=sys.stderr)
        return 1
    except StrataError as e:
        print(f"strata serve: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"strata serve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
