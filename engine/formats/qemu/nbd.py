"""A private ``qemu-nbd`` for one image, and the smallest NBD client that talks to it.

Why NBD at all: a copy that can resume must make its target durable at chosen points (the
checkpoints in the log), and a qcow2 target's tables live in qemu-img's memory until it exits;
``NBD_CMD_FLUSH`` to a ``qemu-nbd`` serving the target writes them and the data out on demand.
And a digest must read the guest-visible bytes of a volume through its chain, which only QEMU's
block layer knows how to read (docs/adr/0031-digests-of-immutable-volumes.md).

The client speaks the fixed-newstyle handshake with ``NBD_OPT_GO`` and simple replies only (no
structured replies: reads come back whole, which is all a sequential copy or hash wants), and
keeps requests in flight so that the server reads the next block while the caller hashes or
writes the last one.

Lifetime: the server is started without ``--persistent``, so it exits when its one client
disconnects, and under ``setpriv --pdeathsig KILL`` where that exists, so a caller killed before
it connected does not leave it holding the image's lock. It is never a daemon of the host: the
storage daemon that serves attached images is another process (ADR 0027).

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from typing import Self

from engine.errors import QemuError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
TFLAG_READ_ONLY = 2
MAX_REQUEST = 32 << 20  # what qemu-nbd accepts in one request
START_TIMEOUT = 30.0
_WRITES_IN_FLIGHT = 4

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdError(OSError):
    """The server answered a request with an error (an errno, as NBD carries it)."""


class NbdServer:
    """``qemu-nbd`` serving ``path`` on a private Unix socket until its client disconnects."""

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        readonly: bool,
        direct: bool = False,
        force_share: bool = False,
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="strata-nbd-")
        self.socket_path = os.path.join(self._dir, "s")
        # force_share (read-only only): no image lock is taken, so no writer is kept out: for
        # a reader of a volume that nobody may write, which must never make a block job fail
        # (a digest of a snapshot removed while it reads; docs/adr/0031). qemu-nbd 7.2 has no
        # --force-share flag; the block layer's option says it, and the backing chain inherits it.
        image = (
            [
                "--image-opts",
                f"driver={fmt},force-share=on,read-only=on,file.filename={path.replace(',', ',,')}",
            ]
            if force_share and readonly
            else [f"--format={fmt}", path]
        )
        args = [
            "qemu-nbd",
            f"--socket={self.socket_path}",
            "--shared=1",
            # cache=none writes around the page cache, like every copy (docs/adr/0006).
            "--cache=none" if direct else "--cache=writeback",
            *(["--read-only"] if readonly else []),
            *image,
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            args = [setpriv, "--pdeathsig", "KILL", *args]
        self.command = shlex.join(args)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _cleanup)
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err
            )
        except OSError as e:
            self._cleanup()
            raise QemuError(command=self.command, returncode=None, stderr=str(e)) from e

    def connect(self) -> NbdClient:
        """The one client; raises the server's own words (a lock it could not take...) if it
        exited instead of listening."""
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.001
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self._failure(code)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    self.close()
                    raise QemuError(
                        command=self.command, returncode=None, stderr="qemu-nbd did not listen"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            try:
                return NbdClient(sock)
            except OSError as e:
                # qemu-nbd listens before it opens the image: one that cannot (a lock held
                # by another writer) accepts the connection and then exits. Its own words
                # say why, not the reset connection.
                sock.close()
                try:
                    code = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.close()
                    raise e from None
                raise self._failure(code) from e
            except BaseException:
                sock.close()
                raise

    def io_counters(self) -> dict[str, int]:
        """The kernel's I/O accounting of the server (``/proc/<pid>/io``): ``wchar`` is what it
        passed to write calls, ``write_bytes`` what it sent to the storage. Empty once gone."""
        try:
            with open(f"/proc/{self.proc.pid}/io") as f:
                return {k: int(v) for k, v in (line.split(": ") for line in f)}
        except (OSError, ValueError):
            return {}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)  # it exits once its client is gone
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def _failure(self, code: int) -> QemuError:
        self._err.seek(0)
        stderr = self._err.read().decode(errors="replace")[-2000:]
        self._cleanup()
        return QemuError(command=self.command, returncode=code, stderr=stderr)

    def _cleanup(self) -> None:
        self._err.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class NbdClient:
    """One connection in transmission phase. Not thread-safe: one caller at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._handle = 0
        self._pending: dict[int, memoryview | None] = {}
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(0, "not a fixed-newstyle NBD server")
        sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        name = b""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = -1
        self.flags = 0
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length) if length else b""
            if magic != REPLY_MAGIC:
                raise NbdError(0, "bad option reply")
            if rtype == REP_ACK:
                break
            if rtype & 0x80000000:
                raise NbdError(0, f"NBD_OPT_GO refused: {payload.decode(errors='replace')}")
            if rtype == REP_INFO and len(payload) >= 12:
                (info,) = struct.unpack(">H", payload[:2])
                if info == INFO_EXPORT:
                    self.size, self.flags = struct.unpack(">QH", payload[2:12])
        if self.size < 0:
            raise NbdError(0, "the server named no export size")

    # --- requests in flight ---------------------------------------------------------------

    def send_read(self, offset: int, buf: memoryview) -> None:
        """Ask for ``len(buf)`` bytes at ``offset``; :meth:`wait` fills ``buf``."""
        self._send(CMD_READ, offset, len(buf), buf)

    def send_write(self, offset: int, data: memoryview | bytes) -> None:
        self._send(CMD_WRITE, offset, len(data), None, data)

    def wait(self) -> None:
        """Wait for one answer (qemu-nbd answers in any order: each reply names its request)
        and, for a read, take its data into the request's buffer."""
        magic, error, handle = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle not in self._pending:
            raise NbdError(0, "malformed NBD reply")
        buf = self._pending.pop(handle)
        if error:
            raise NbdError(error, os.strerror(error))
        if buf is not None:
            self._recv_into(buf)

    def drain(self) -> None:
        while self._pending:
            self.wait()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # --- whole requests -------------------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.drain()
        for start in range(0, len(buf), MAX_REQUEST):
            self.send_read(offset + start, buf[start : start + MAX_REQUEST])
        self.drain()

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Send the write and return once it is sent (``data`` may then be reused), with a few
        earlier ones still unanswered: the server writes one while the next comes. Writes in
        flight run in any order, so a caller never writes one range twice without a
        :meth:`flush` between. An error is raised by a later call; :meth:`flush` waits for
        every answer."""
        view = memoryview(data)
        for start in range(0, len(view), MAX_REQUEST):
            while self.in_flight >= _WRITES_IN_FLIGHT:
                self.wait()
            self.send_write(offset + start, view[start : start + MAX_REQUEST])

    def write_zeroes(self, offset: int, length: int) -> None:
        self.drain()  # the server runs requests at once: never one over a write in flight
        for start in range(0, length, MAX_REQUEST):
            self._send(CMD_WRITE_ZEROES, offset + start, min(MAX_REQUEST, length - start), None)
        self.drain()

    def flush(self) -> None:
        self.drain()
        self._send(CMD_FLUSH, 0, 0, None)
        self.drain()

    def close(self) -> None:
        try:
            self.drain()
            self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- wire -----------------------------------------------------------------------------

    def _send(
        self,
        cmd: int,
        offset: int,
        length: int,
        buf: memoryview | None,
        data: memoryview | bytes | None = None,
    ) -> None:
        self._handle += 1
        header = _REQUEST.pack(REQUEST_MAGIC, 0, cmd, self._handle, offset, length)
        if data is None:
            self._sock.sendall(header)
        else:
            self._sock.sendall(header)
            self._sock.sendall(data)
        self._pending[self._handle] = buf

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            n = self._sock.recv_into(buf[got:])
            if n == 0:
                raise NbdError(0, "the NBD server closed the connection")
            got += n
