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
import threading
from collections.abc import Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from engine.errors import DaemonError

_T = TypeVar("_T")
_LOOP_GRACE = 1.0  # seconds the loop's own housekeeping may take beyond a call's timeout


async def _finish_pending() -> None:
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    if pending:
        _, late = await asyncio.wait(pending, timeout=_LOOP_GRACE)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


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
        # The timeout is applied inside the loop, so that a late call is cancelled there and
        # the client tidies up (a half-made connection is closed) before the caller hears of it.
        timed = asyncio.wait_for(coroutine, self.timeout)
        future = asyncio.run_coroutine_threadsafe(timed, self._loop)
        try:
            return future.result(self.timeout + _LOOP_GRACE)
        except ExecuteError as e:
            raise DaemonError(
                command=command, error_class=e.error_class, desc=str(e), socket=self.socket
            ) from e
        except TimeoutError as e:  # asyncio's and concurrent.futures' are this one since 3.11
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
        # The client leaves tasks behind (a disconnect it scheduled); let them end first, so
        # that nothing is destroyed half-run when the loop stops.
        with suppress(TimeoutError):  # a wedged task: stopping the loop drops it anyway
            finish = asyncio.run_coroutine_threadsafe(_finish_pending(), self._loop)
            finish.result(_LOOP_GRACE * 2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self._loop.close()
