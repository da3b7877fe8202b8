"""``strata-log hosts``: every host the repository knows, its last heartbeat, and the stages
each host that is gone left claimed.

Hosts come from the log (who appended what, when) and from the heartbeat records in
``<repository>/hosts/`` (read by :func:`engine.executors.liveness.heartbeats`), which are not
log events. A one-shot look cannot watch a record age the way the engine does (it counts a host
dead once it has seen the record unchanged for ``lease_timeout`` of its own clock), so here a
host is judged by the wall time in its record against this machine's clock: ``alive``, ``dead``
(older than its lease timeout), ``left`` (it disconnected cleanly) or ``unknown`` (no readable
record, e.g. when PATH is a bare log directory).

Imports: public engine names only, as all of log_tools (docs/adr/0025): the heartbeats of
:mod:`engine.executors` and the replay of :mod:`engine.projections`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from engine.executors.liveness import Heartbeat, heartbeats
from engine.projections.point_in_time import Replay
from log_tools.paths import repository_root
from log_tools.render import iso_time, printable, to_json
from log_tools.replay import replay_at

ALIVE, DEAD, LEFT, UNKNOWN = "alive", "dead", "left", "unknown"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], path_help: str) -> None:
    command = commands.add_parser(
        "hosts",
        help="hosts seen, their last heartbeat, and the stages dead hosts left claimed",
        description="Every host that appended to the log or keeps a heartbeat in the "
        "repository: its records, its last heartbeat (judged against this machine's clock), "
        "and the stages it holds claimed that nobody finished.",
    )
    command.add_argument("path", metavar="PATH", help=path_help)
    command.add_argument("--json", action="store_true", help="one JSON object instead of text")
    command.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    _, state = replay_at(args.path, None)
    report = hosts_report(repository_root(args.path), state, time.time())
    if args.json:
        print(to_json(report))
    else:
        write_text(report, sys.stdout)
    return 0


def judge(beat: Heartbeat | None, now: float) -> tuple[str, float | None]:
    """The host's state and the age of its record in seconds."""
    if beat is None:
        return UNKNOWN, None
    age = max(0.0, now - beat.wall_time)
    if beat.released:
        return LEFT, age
    return (DEAD if age > beat.lease_timeout else ALIVE), age


def hosts_report(root: str | None, state: Replay, now: float) -> dict[str, Any]:
    beats = {} if root is None else heartbeats(root)
    claims = state.claims()
    rows = []
    for host_id in sorted(set(state.hosts) | set(beats)):
        seen = state.hosts.get(host_id)
        beat = beats.get(host_id)
        verdict, age = judge(beat, now)
        rows.append(
            {
                "host_id": host_id,
                "state": verdict,
                "records": 0 if seen is None else seen.records,
                "first_seq": None if seen is None else seen.first_seq,
                "first_time": None if seen is None else iso_time(seen.first_time_ns),
                "last_seq": None if seen is None else seen.last_seq,
                "last_time": None if seen is None else iso_time(seen.last_time_ns),
                "heartbeat_time": None if beat is None else iso_time(int(beat.wall_time * 1e9)),
                "heartbeat_age_seconds": None if age is None else round(age, 1),
                "heartbeat": None if beat is None else asdict(beat),
                "claims": sum(1 for c in claims if c.host_id == host_id),
            }
        )
    states = {row["host_id"]: row["state"] for row in rows}
    return {
        "repository": root,
        "judged_at": iso_time(int(now * 1e9)),
        "position": state.position,
        "hosts": rows,
        "claims": [
            {
                "image_id": str(c.image.id),
                "op_id": c.op_id,
                "purpose": c.purpose,
                "stage": c.stage,
                "epoch": c.epoch,
                "host_id": c.host_id,
                "host_state": states.get(c.host_id, UNKNOWN),
                "left_claimed": states.get(c.host_id, UNKNOWN) != ALIVE,
                "claimed_seq": c.seq,
                "claimed_time": iso_time(c.time_ns),
            }
            for c in claims
        ],
    }


def write_text(report: dict[str, Any], out: TextIO) -> None:
    where = report["repository"] or "(a log directory: no heartbeats to read)"
    out.write(f"repository {where}\nlog        up to record {report['position']}\n")
    out.write(f"judged at  {report['judged_at']} (heartbeat wall time vs this clock)\n\n")
    out.write(f"{'HOST':<20}  {'STATE':<7}  {'RECORDS':>7}  {'LAST RECORD':<30}  HEARTBEAT\n")
    for row in report["hosts"]:
        beat = "unknown"
        if row["heartbeat_time"] is not None:
            beat = f"{row['heartbeat_time']} ({row['heartbeat_age_seconds']} s ago)"
        out.write(
            f"{printable(row['host_id']):<20}  {row['state']:<7}  {row['records']:>7}  "
            f"{row['last_time'] or '-':<30}  {beat}\n"
        )
    left = [c for c in report["claims"] if c["left_claimed"]]
    running = len(report["claims"]) - len(left)
    out.write(f"\nstages left claimed by hosts that are not alive: {len(left)}")
    out.write(f" (and {running} claimed by live hosts)\n" if running else "\n")
    for c in left:
        out.write(
            f"  {printable(c['host_id'])} ({c['host_state']}): image {c['image_id']} "
            f"{c['purpose']} stage {c['stage']} epoch {c['epoch']}, claimed at record "
            f"{c['claimed_seq']} ({c['claimed_time']})\n"
        )
