"""A synchronous QMP client: ``qemu.qmp``'s asyncio client, run on a private event loop.

The engine is threaded, not asyncio, and several of its threads may ask the daemon at once.
``qemu.qmp``'s own synchronous shim (``legacy.QEMUMonitorProtocol``) runs the loop of whichever
thread calls it, so two threads would drive one connection from two loops. Here one thread owns
the loop and the connection, and callers hand it coroutines (``run_coroutine_threadsafe``), which
is safe from any thread. Every failure leaves as a :class:`DaemonError` (docs/adr/0027).

Imports: ``engine.errors``; ``qemu.qmp``; the standard library.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from engine.errors import DaemonError

_T = TypeVar("_T")


class QmpConnection:
    """One monitor connection to the daemon listening on ``socket``; ``close()`` when done.

    A monitor serves one client at a time (a second one is never greeted), so the engine keeps
    exactly one connection per daemon; ``timeout`` bounds every wait, the greeting included.
    """

    def __init__(self, socket: str, *, timeout: float) -> None:
        self.socket = socket
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp {socket}", daemon=True
        )
        self._thread.start()
        try:
            self._client = self._run("connect", self._connect())
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(self) -> QMPClient:
        # Made inside the loop: the client's queues and events belong to the loop that runs it.
        client = QMPClient("strata")
        await client.connect(self.socket)
        return client

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """QMP ``command``'s return value, or :class:`DaemonError` with QEMU's error class."""
        return self._run(command, self._client.execute(command, arguments))

    def close(self) -> None:
        """Disconnect and stop the loop; the daemon keeps running."""
        try:
            self._run("disconnect", self._client.disconnect())
        except DaemonError:
            pass  # a daemon that quit has already dropped the connection: nothing to undo
        finally:
            self._stop_loop()

    def _run(self, command: str, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.timeout)
        except ExecuteError as e:
            raise DaemonError(
                command=command, error_class=e.error_class, desc=str(e), socket=self.socket
            ) from e
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise DaemonError(
                command=command,
                error_class=None,
                desc=f"no answer within {self.timeout} s",
                socket=self.socket,
            ) from e
        except (QMPError, OSError, EOFError) as e:
            raise DaemonError(
                command=command, error_class=None, desc=str(e) or repr(e), socket=self.socket
            ) from e

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self._loop.close()
