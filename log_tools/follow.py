"""``strata-log follow``: print records as hosts append them, like ``tail -f``.

Woken by :class:`~engine.log.follow.LogFollower` (watchdog's inotify observer for this
machine's appenders, a periodic look for other machines' on shared storage). Only whole
transactions are printed. It never appends, so it never creates the log's lock file or cuts a
torn tail. ``--count`` and ``--timeout`` bound it, for scripts and tests.

Imports: its own package, ``engine.log``; the standard library.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading

from engine.log.follow import LogFollower
from engine.log.store import OperationLog
from log_tools.paths import find_log_dir, positive_int, seconds
from log_tools.render import record_json, record_line

READER_ID = "strata-log"  # the log wants a host id even from a reader; it never writes one


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "follow",
        help="print records as they are appended (until interrupted)",
        description="Print the log's records as other hosts append them. Starts after the "
        "last record unless --from says otherwise; stops at Ctrl-C, --count or --timeout.",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("--json", action="store_true", help="one JSON object per line")
    command.add_argument(
        "--from", dest="from_seq", type=positive_int, metavar="SEQ", help="first record"
    )
    command.add_argument("--count", type=positive_int, metavar="N", help="stop after N records")
    command.add_argument("--timeout", type=seconds, metavar="S", help="stop after S seconds")
    command.add_argument(
        "--poll", type=seconds, default=0.5, metavar="S", help="look at least every S seconds"
    )
    command.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    timer = None if args.timeout is None else threading.Timer(args.timeout, stop.set)
    with OperationLog.open(find_log_dir(args.path), READER_ID) as log:
        start = args.from_seq or log.last_seq + 1
        with LogFollower(log, poll_interval=min(args.poll, args.timeout or args.poll)) as follower:
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                for record in itertools.islice(follower.follow(start, stop), args.count):
                    line = json.dumps(record_json(record)) if args.json else record_line(record)
                    print(line, flush=True)
            except KeyboardInterrupt:
                return 130  # interrupted is how a follow ends; nothing went wrong
            finally:
                if timer is not None:
                    timer.cancel()
    return 0
