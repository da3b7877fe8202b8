"""A subscription to the application sequence that wakes when the log grows, whoever appended.

eventsourcing's ``ListenNotifySubscription`` pulls in a thread and sleeps on an event that a
database's NOTIFY sets. The log has no server to notify, so the pull thread sleeps in a
:class:`LogFollower` instead: this process's appends wake it at once, other processes' appends
through inotify (or a polling observer) and, as a floor, a refresh every ``poll_interval``.
The pull loop below is the library's, with that one change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from eventsourcing.persistence import ListenNotifySubscription, ShutDown

from engine.log.follow import LogFollower

if TYPE_CHECKING:
    from engine.persistence.recorders import LogApplicationRecorder


# wait() is bounded by the follower's poll interval anyway; this bounds each call once more.
_WAIT_SLICE = 1.0


class LogSubscription(ListenNotifySubscription["LogApplicationRecorder"]):
    def __init__(
        self,
        recorder: LogApplicationRecorder,
        follower: LogFollower,
        gt: int | None = None,
        topics: Sequence[str] = (),
    ) -> None:
        # Set up before the base class starts the pull thread, which uses both.
        self._log = recorder.log
        self._follower = follower.start()
        super().__init__(recorder=recorder, gt=gt, topics=topics)

    def stop(self) -> None:
        super().stop()
        self._follower.stop()  # releases the pull thread if it is waiting

    def _loop_on_pull(self) -> None:
        try:
            scanned = self._pull_matching()
            while not self._has_been_stopped:
                self._follower.wait(scanned, timeout=_WAIT_SLICE)
                scanned = self._pull_matching()
        except BaseException as e:
            if self._thread_error is None:
                self._thread_error = e
            self.stop()

    def _pull_matching(self) -> int:
        """Queue every matching notification; return a sequence up to which all were seen."""
        scanned = self._log.last_seq
        while not self._has_been_stopped:
            # Taken before the select, so the select has looked at every record up to it.
            scanned = self._log.last_seq
            notifications = self._recorder.select_notifications(
                start=self._last_notification_id or 0,
                limit=self._select_limit,
                topics=self._topics,
                inclusive_of_start=False,
            )
            if notifications:
                try:
                    self._notifications_queue.put(notifications)
                except ShutDown:
                    break
                self._last_notification_id = notifications[-1].id
            if len(notifications) < self._select_limit:
                # Nothing else matches up to `scanned`: skip past it, so a topic filter does
                # not make the next pull decode the same unmatched records again.
                self._last_notification_id = max(self._last_notification_id or 0, scanned)
                break
        return scanned
