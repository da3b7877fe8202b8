"""Following a log that other processes and hosts append to.

Three ways a follower learns that the log grew, fastest first:

* this process's own appends wake it at once (:meth:`OperationLog.listen`);
* other processes' appends on a local filesystem wake it through inotify (watchdog's default
  observer) within milliseconds;
* on shared filesystems inotify sees nothing that another machine writes, so a polling
  observer (``polling=True``) or, always, a bounded periodic :meth:`OperationLog.refresh`
  catches them within ``poll_interval`` seconds.

No wait is ever unbounded: :meth:`LogFollower.wait` takes a timeout and :meth:`LogFollower.follow`
checks its stop event at least every ``poll_interval``.

Imports: its own package, ``engine.errors``, watchdog; the standard library.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from engine.errors import InvalidParameter
from engine.log.framing import Record
from engine.log.store import OperationLog


class _Wake(FileSystemEventHandler):
    """Counts wake-ups; waiters compare counts so no wake-up is lost between two waits."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.generation = 0

    def set(self) -> None:
        with self.cv:
            self.generation += 1
            self.cv.notify_all()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.set()


class LogFollower:
    """Wakes waiters when ``log`` grows, whoever appended."""

    def __init__(self, log: OperationLog, *, poll_interval: float = 1.0, polling: bool = False):
        if not isinstance(poll_interval, int | float) or not 0 < poll_interval <= 60:
            raise InvalidParameter("a number of seconds in (0, 60]", name="poll_interval")
        self._log = log
        self._poll_interval = float(poll_interval)
        self._wake = _Wake()
        self._observer: BaseObserver = (
            PollingObserver(timeout=self._poll_interval) if polling else Observer()
        )
        self._started = False

    def start(self) -> LogFollower:
        if not self._started:
            self._log.listen(self._wake)
            self._observer.schedule(self._wake, self._log.directory, recursive=False)
            self._observer.start()
            self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._log.unlisten(self._wake)
            self._observer.stop()
            self._observer.join(timeout=5)
        self._wake.set()  # release anyone still waiting

    def __enter__(self) -> LogFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Block until the log holds a record past ``after_seq``; False when ``timeout`` ran out."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            generation = self._wake.generation
            if self._log.refresh() > after_seq:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._started:
                return False
            with self._wake.cv:
                if self._wake.generation == generation:
                    self._wake.cv.wait(min(remaining, self._poll_interval))

    def follow(self, start_seq: int = 1, stop: threading.Event | None = None) -> Iterator[Record]:
        """Yield every record from ``start_seq`` on, as it is appended, until ``stop`` is set."""
        next_seq = start_seq
        while stop is None or not stop.is_set():
            for record in self._log.read(next_seq, limit=1024):
                yield record
                next_seq = record.seq + 1
            if not self._started:
                return
            self.wait(next_seq - 1, self._poll_interval)
