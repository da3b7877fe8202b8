"""Reading a segment's next chunks and hashing their frames in a thread, ahead of the scan.

For :class:`engine.log.reader.ReadOnlyLog` (docs/adr/0009-hash-the-log-ahead-in-a-second-thread.md):
only with the C extension ``engine.log._readahead`` (engine/log/csrc/readahead.c), which reads
and hashes without the GIL; without it the reader reads and hashes as it scans.

Imports: engine.log.scan (FrameHashes) and the standard library.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from engine.log.scan import FrameHashes

_Read = tuple[int, int, bytes, bytes, int]  # engine/log/csrc/readahead.c read_frames()

compiled_read_frames: Callable[[int, int, int, int, int], list[_Read]] | None
compiled_hash_frames: Callable[[bytes], tuple[bytes, int]] | None
try:
    from engine.log._readahead import hash_frames as compiled_hash_frames
    from engine.log._readahead import read_frames as compiled_read_frames
except ImportError:  # built without a C compiler: no reading ahead (ReadOnlyLog.read_ahead)
    compiled_read_frames = compiled_hash_frames = None


def hash_frames(buf: bytes) -> FrameHashes | None:
    """Hash the frames of ``buf`` for a later scan of it; None without the C extension.

    The hashing (half of a scan's time) runs with the GIL released, so another thread can do
    it while the one that will scan ``buf`` does other work.
    """
    if compiled_hash_frames is None:
        return None
    digests, end = compiled_hash_frames(buf)
    return FrameHashes(buf, digests, end)


# Chunks a segment's read-ahead thread reads and hashes at a time; it holds at most three such
# groups: the consumer's, one ready, one being read.
READ_AHEAD = 4


class ReadAhead:
    """A thread that reads a segment's next chunks and hashes their frames, ahead of the scan.

    Hashing is half of a scan's time and needs no GIL (engine/log/csrc/readahead.c), so on a
    machine with a second core it runs while the consumer builds records and folds them. The
    thread guesses that each chunk starts where the frames of the one before it end, which
    holds for every chunk of a sound segment; the consumer takes a chunk only if it is the one
    it was about to read itself, and otherwise closes the read-ahead and reads on alone.
    Nothing the thread meets is reported from it: a failed read ends the read-ahead, and the
    consumer's own read of that chunk meets the error where it always did.

    The thread takes the GIL once per READ_AHEAD chunks: a thread waiting for it while the
    consumer computes gets it only after the switch interval (5 ms), about a chunk's scan.
    """

    def __init__(self, fd: int, pos: int, size: int, chunk: int) -> None:
        # Lists of chunks: (pos, bytes asked, the bytes read and hashed); None: no more.
        self._ready: queue.Queue[list[tuple[int, int, FrameHashes]] | None] = queue.Queue(1)
        self._group: list[tuple[int, int, FrameHashes]] = []
        self._stop = threading.Event()
        self._ended = False  # the thread's last item (None) was taken
        self._thread = threading.Thread(
            target=self._run, args=(fd, pos, size, chunk), name="strata-log-read-ahead", daemon=True
        )
        self._thread.start()

    def _run(self, fd: int, pos: int, size: int, chunk: int) -> None:
        assert compiled_read_frames is not None  # ReadOnlyLog reads ahead only with it
        try:
            while pos < size and not self._stop.is_set():
                read = compiled_read_frames(fd, pos, size, chunk, READ_AHEAD)
                group = [(at, asked, FrameHashes(buf, d, end)) for at, asked, buf, d, end in read]
                self._ready.put(group)
                at, asked, last = group[-1]
                if len(last.buf) < asked or last.end == 0 or at + last.end >= size:
                    break  # the end of the file, or a chunk the consumer will read again larger
                pos = at + last.end
        except OSError:
            pass  # the consumer reads this chunk itself and meets the error there
        finally:
            self._ready.put(None)

    def take(self, pos: int, asked: int) -> FrameHashes | None:
        """The chunk of ``asked`` bytes at ``pos``, read and hashed; None if it was not read."""
        if not self._group:
            if self._ended:
                return None
            group = self._ready.get()
            if group is None:
                self._ended = True
                return None
            self._group = group[::-1]
        at, size, hashes = self._group.pop()
        return hashes if (at, size) == (pos, asked) else None

    def close(self) -> None:
        """Stop the thread and wait for it: it finishes at most the chunks it is reading."""
        self._stop.set()
        self._group = []
        while not self._ended:  # each item taken makes room for the next, up to the last
            self._ended = self._ready.get() is None
        self._thread.join()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # what taskset or a container's cpuset allows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
