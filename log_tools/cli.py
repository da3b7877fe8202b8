"""``strata-log``: the auditor's command line over a repository's operation log.

Exit status: 0 when the log is sound (a torn tail is sound), 1 when it is damaged, 2 when the
path is not a Strata log, its version is unknown, or the arguments are wrong (an image the log
does not name, a point outside the log, ...), 3 when the tool could not finish for a reason
that is not the log's (the operating system refused a read or a write, Graphviz failed or ran
out of time). The engine's own errors, and the operating system's (translated by
:mod:`log_tools.failures`), are turned into one line on stderr; anything else is a bug and
keeps its traceback.

Imports: its own package, ``engine.errors``; the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from engine.errors import StrataError
from log_tools import dump, export, follow, graph, history, hosts, replay, verify
from log_tools.failures import exit_status, from_os_error
from log_tools.paths import find_log_dir, positive_int

PROG = "strata-log"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args)  # called as a library from a thread: signals are not ours to take
    stops = (signal.SIGTERM, signal.SIGHUP)
    before = [signal.signal(stop, _stopped) for stop in stops]
    try:
        return _run(args)
    finally:
        for stop, handler in zip(stops, before, strict=True):
            signal.signal(stop, handler)


def _run(args: argparse.Namespace) -> int:
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except StrataError as e:
        return _report(e)
    except BrokenPipeError:
        # The reader went away (`strata-log dump | head`): stop quietly, as other Unix tools do.
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # after BrokenPipeError, which is one
        return _report(from_os_error(e, args.path))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT  # what was written is cleaned up (finally); no traceback


def _stopped(signum: int, frame: object) -> None:
    # Unwound like Ctrl-C, so that what a command was writing is removed on the way out.
    raise SystemExit(128 + signum)


def _report(error: StrataError) -> int:
    with contextlib.suppress(OSError):  # stdout may be what failed
        sys.stdout.flush()  # what was read before the error comes first, as it happened
    print(f"{PROG}: error [{error.code}]: {error.message}", file=sys.stderr)
    return exit_status(error)


def _verify(args: argparse.Namespace) -> int:
    summary = verify.verify(find_log_dir(args.path))
    if args.json:
        print(json.dumps(verify.to_json(summary), indent=2))
    else:
        verify.write_text(summary, sys.stdout)
    if summary.damage is not None:
        raise summary.damage
    return 0


def _dump(args: argparse.Namespace) -> int:
    tail = dump.dump(
        find_log_dir(args.path),
        sys.stdout,
        as_json=args.json,
        start=args.from_seq,
        limit=args.limit,
    )
    if tail is not None and tail.torn:
        sys.stdout.flush()
        print(
            f"{PROG}: note: segment {tail.segment} ends in a torn tail at byte offset "
            f"{tail.end} ({tail.size - tail.end} bytes a crash left mid-append; not part of the "
            f"log)",
            file=sys.stderr,
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Audit a Strata repository's operation log (read-only).",
        epilog="Exit status: 0 done (the log is sound; a torn tail is sound), 1 the log is "
        "damaged, 2 PATH is not a Strata log or the arguments are wrong, 3 the tool could not "
        "finish (the operating system refused a read or a write, Graphviz failed).",
    )
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    path_help = "a repository directory (holding log/) or its log/ directory"

    check = commands.add_parser(
        "verify",
        help="check framing, checksums, sequence and hash chain of every segment",
        description="Check the whole log without writing to it. Exit 0 when sound (a torn "
        "tail left by a crash is sound), 1 when damaged, 2 when PATH is not a Strata log, 3 "
        "when it cannot be read.",
    )
    check.add_argument("path", metavar="PATH", help=path_help)
    check.add_argument("--json", action="store_true", help="one JSON object instead of text")
    check.set_defaults(command=_verify)

    show = commands.add_parser(
        "dump",
        help="print every record",
        description="Print the log's records in order (only whole transactions), checking "
        "them as they are read. Byte strings are hex in JSON.",
    )
    show.add_argument("path", metavar="PATH", help=path_help)
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.add_argument(
        "--from",
        dest="from_seq",
        type=positive_int,
        default=1,
        metavar="SEQ",
        help="first sequence",
    )
    show.add_argument("--limit", type=positive_int, metavar="N", help="print at most N records")
    show.set_defaults(command=_dump)
    for module in (history, replay, export, graph, follow, hosts):
        module.register(commands, path_help)
    return parser
