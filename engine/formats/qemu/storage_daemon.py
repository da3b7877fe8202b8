"""The host's storage daemon as the engine uses it: volume chains as block nodes, NBD exports.

A :class:`StorageDaemon` is a handle on the one ``qemu-storage-daemon`` of a host's state dir
(docs/adr/0027). The first call that needs the daemon finds it (a restarted engine reconnects to
the daemon its predecessor started, exports and jobs included) or starts it; ``close()`` lets go
of it and leaves it serving, ``stop()`` ends it. The NBD server listens on a Unix socket from the
daemon's start, so an export is one ``block-export-add``. What QMP returns comes back as plain
frozen dataclasses, and every refusal as a :class:`DaemonError`. Live snapshots, reopening and
reading the node graph are here; block jobs are :class:`~engine.formats.qemu.block_jobs.BlockJobs`,
which this class is made of (never ``auto-finalize: false``: see that module).

Node names are the caller's: QEMU allows 31 characters, starting with a letter; each volume gets
a format node of that name over a ``file`` node named with :data:`FILE_SUFFIX`.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from engine.errors import DaemonError, InvalidParameter
from engine.formats.qemu import daemon_process
from engine.formats.qemu.args import check_image_format
from engine.formats.qemu.block_jobs import BlockJobs, Job
from engine.formats.qemu.daemon_process import DaemonPaths
from engine.formats.qemu.direct_io import accepts_direct_io
from engine.formats.qemu.qmp import QmpConnection

FILE_SUFFIX = "-file"
_NODE_NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_.-]{{0,{30 - len(FILE_SUFFIX)}}}\Z")
_EXPORT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}\Z")
DEFAULT_TIMEOUT = 30.0

__all__ = ["DEFAULT_TIMEOUT", "FILE_SUFFIX", "ChainVolume", "Export", "Job", "StorageDaemon"]


@dataclass(frozen=True)
class ChainVolume:
    """One volume of a chain to attach: its format node's name, its file and its format."""

    node: str
    path: str
    format: str


@dataclass(frozen=True)
class Export:
    """An NBD export, as ``query-block-exports`` reports it."""

    id: str
    node: str
    type: str
    shutting_down: bool


class StorageDaemon(BlockJobs):
    """The daemon of ``state_dir`` (its files in ``<state_dir>/daemon``)."""

    def __init__(self, state_dir: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.paths = DaemonPaths(os.path.join(os.path.abspath(state_dir), "daemon"))
        self.paths.check()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._qmp: QmpConnection | None = None
        self._process: subprocess.Popen[bytes] | None = None  # when this object started it

    # --- the process -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The running daemon's pid, or None; never starts one."""
        return daemon_process.running_pid(self.paths)

    def nbd_uri(self, name: str) -> str:
        """What ``qemu-io -f raw`` or a virtual machine opens to reach export ``name``."""
        return f"nbd+unix:///{_export_name(name)}?socket={self.paths.nbd_socket}"

    def close(self) -> None:
        """Let go of the daemon, which keeps serving (what an engine does when it stops)."""
        with self._lock:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None

    def stop(self) -> None:
        """End the daemon if one runs: QMP ``quit``, then SIGKILL if it lingers."""
        with self._lock:
            pid = daemon_process.running_pid(self.paths)
            if pid is None:
                self._drop_connection()
                if self._process is not None and self._process.poll() is not None:
                    self._process = None  # ended by another handle: reaped here, not a zombie
                return
            # Unreachable or already going: the kill below ends it either way.
            with suppress(DaemonError):
                self._connection().execute("quit")
            self._drop_connection()
            if not daemon_process.wait_gone(pid, self._process, self.timeout):
                daemon_process.kill(pid, self._process)
            self._process = None
            for leftover in (self.paths.qmp_socket, self.paths.nbd_socket, self.paths.pid_file):
                if os.path.lexists(leftover):
                    os.unlink(leftover)

    # --- block nodes -----------------------------------------------------------------------
    def add_chain(self, volumes: Sequence[ChainVolume], *, read_only: bool) -> str:
        """Open ``volumes`` (base first) as one chain of nodes and return the top node's name.

        Backing links are the node names given, never what the headers say (the base is opened
        with ``backing: null``); every volume below the top is read-only. If one volume fails,
        the nodes already added are removed again.
        """
        if not volumes:
            raise InvalidParameter("at least one volume", name="volumes")
        added: list[str] = []
        below: str | None = None
        try:
            for i, volume in enumerate(volumes):
                options = _node_options(volume, below, read_only or i < len(volumes) - 1)
                self._execute("blockdev-add", options)
                added.append(volume.node)
                below = volume.node
        except DaemonError:
            # The refusal is what the caller must see; a failed undo is chained to it by Python
            # and leaves nodes that a later attach of the same names reports.
            with suppress(DaemonError):
                self.remove_nodes(reversed(added))
            raise
        return volumes[-1].node

    def remove_nodes(self, nodes: Iterable[str]) -> None:
        """``blockdev-del`` each format node, in the order given (top first); its ``file`` node,
        added inline with it, goes with it."""
        for node in nodes:
            self._execute("blockdev-del", {"node-name": node})

    def add_overlay(self, volume: ChainVolume) -> str:
        """Open a qcow2 overlay (made with ``qemu-img create -u``) writable with ``backing: null``,
        ready for :meth:`snapshot`, which links it; returns its node name. Opened with its
        header's backing, it would open the in-use volume below a second time and fail on its
        write lock."""
        if volume.format != "qcow2":
            raise InvalidParameter(f"an overlay is qcow2, not {volume.format!r}", name="format")
        self._execute("blockdev-add", _node_options(volume, None, False))
        return volume.node

    def snapshot(self, switches: Sequence[tuple[str, str]]) -> None:
        """Switch each ``(top, overlay)`` pair in one ``transaction``: every disk or none.

        ``blockdev-snapshot`` puts the overlay in place of the top for all of its users, the NBD
        export included, so a client keeps its connection and its writes land in the overlay;
        the old top becomes the overlay's read-only backing, flushed first.
        """
        if not switches:
            raise InvalidParameter("at least one (top, overlay) pair", name="switches")
        actions = [
            {"type": "blockdev-snapshot", "data": {"node": top, "overlay": overlay}}
            for top, overlay in switches
        ]
        self._execute("transaction", {"actions": actions})

    def reopen(self, volume: ChainVolume, *, below: str | None, read_only: bool) -> None:
        """``blockdev-reopen`` an open volume with the options it was opened with, its backing
        link ``below`` (a node name, or None: none) and ``read_only``; how a commit's base
        becomes writable (QEMU 7.2 refuses to commit into a read-only node)."""
        self._execute("blockdev-reopen", {"options": [_node_options(volume, below, read_only)]})

    def backing_chain(self, node: str) -> list[str]:
        """The format nodes from ``node`` down to its base, following backing links; the filter
        nodes QEMU puts in during a job (named ``#...``) are looked through.

        Read from ``x-debug-query-block-graph``, the one query of QEMU 7.2 that names every
        node and its links (``query-named-block-nodes`` gives the backing files, not the nodes).
        """
        graph = self._execute("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"] if n["type"] == "block-driver"}
        links = {(e["parent"], e["name"]): e["child"] for e in graph["edges"]}
        current = next((i for i, name in names.items() if name == node), None)
        if current is None:
            raise DaemonError(
                command="x-debug-query-block-graph",
                error_class="DeviceNotFound",
                desc=f"no node {node}",
                socket=self.paths.qmp_socket,
            )
        chain: list[str] = []
        while current is not None:
            if names[current].startswith("#"):  # a job's filter: over "backing" or "file"
                current = links.get((current, "backing"), links.get((current, "file")))
            else:
                chain.append(names[current])
                current = links.get((current, "backing"))
        return chain

    def export_node(self, name: str) -> str | None:
        """The format node export ``name`` serves now (None: no such export): after a live
        snapshot the overlay, after an active commit's pivot the base, a job's filter looked
        through."""
        node = next((e.node for e in self.query_exports() if e.id == _export_name(name)), None)
        if node is None or not node.startswith("#"):
            return node
        return self.backing_chain(node)[0]

    # --- exports ---------------------------------------------------------------------------
    def export_nbd(self, node: str, name: str, *, writable: bool) -> str:
        """Export ``node`` over NBD as ``name`` (also the export's id); returns its URI."""
        arguments = {
            "type": "nbd",
            "id": _export_name(name),
            "node-name": node,
            "name": name,
            "writable": writable,
        }
        self._execute("block-export-add", arguments)
        return self.nbd_uri(name)

    def unexport(self, name: str) -> None:
        """Stop exporting ``name`` and return once it is gone, so its nodes can be removed
        (``block-export-del`` only starts the removal; clients are disconnected meanwhile)."""
        self._execute("block-export-del", {"id": _export_name(name)})
        deadline = time.monotonic() + self.timeout
        while any(e.id == name for e in self.query_exports()):
            if time.monotonic() > deadline:
                raise DaemonError(
                    command="block-export-del",
                    error_class=None,
                    desc=f"export {name} still there after {self.timeout} s",
                    socket=self.paths.qmp_socket,
                )
            time.sleep(0.02)

    def query_exports(self) -> list[Export]:
        return [
            Export(e["id"], e["node-name"], e["type"], e["shutting-down"])
            for e in self._execute("query-block-exports")
        ]

    # --- the connection --------------------------------------------------------------------
    @property
    def _socket(self) -> str:
        return self.paths.qmp_socket

    def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._connection().execute(command, arguments)

    def _connection(self) -> QmpConnection:
        """The monitor connection, finding or starting the daemon first (called locked)."""
        if self._qmp is None:
            os.makedirs(self.paths.directory, mode=0o700, exist_ok=True)
            with daemon_process.start_lock(self.paths):
                if daemon_process.running_pid(self.paths) is None:
                    self._process = daemon_process.start(self.paths, timeout=self.timeout)
                self._qmp = QmpConnection(self.paths.qmp_socket, timeout=self.timeout)
        return self._qmp

    def _drop_connection(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None


def _node_options(volume: ChainVolume, below: str | None, read_only: bool) -> dict[str, Any]:
    if not _NODE_NAME.match(volume.node):
        raise InvalidParameter(
            f"a letter, then letters, digits, '-', '.' or '_', at most "
            f"{31 - len(FILE_SUFFIX)} characters, not {volume.node!r}",
            name="node",
        )
    fmt = check_image_format(volume.format)
    options: dict[str, Any] = {
        "driver": fmt,
        "node-name": volume.node,
        "read-only": read_only,
        "file": {
            "driver": "file",
            "node-name": volume.node + FILE_SUFFIX,
            "filename": os.path.abspath(volume.path),
            "read-only": read_only,
            # cache=none, as virtual machines on shared storage run: what the guest was told is
            # written is not waiting in this host's page cache, which would also make a large
            # job's writes throttle the guest's (docs/adr/0028).
            "cache": {"direct": accepts_direct_io(volume.path, create=False)},
        },
    }
    if fmt == "qcow2":
        options["backing"] = below  # None is JSON null: do not open what the header names
    elif below is not None:
        raise InvalidParameter(f"a raw volume only as a chain's base: {volume.path}", name="format")
    return options


def _export_name(name: str) -> str:
    if not _EXPORT_NAME.match(name):
        raise InvalidParameter(
            f"a letter, then letters, digits, '-', '.' or '_', not {name!r}", name="export"
        )
    return name
