"""``strata serve``'s cost: the API over its Unix socket against the facade called directly, and
how soon ``GET /events`` shows another host's append.

    python bench/serve.py [--dir DIR] [--calls N] [--creates N] [--lag-samples N] [--poll S]

The server is uvicorn in a process of its own (host ``host-a``), serving the app ``strata serve``
serves (:func:`strata_server.app.make_app`, its event stream included); this process is
``host-b``, a second :class:`~engine.StorageEngine` on the same repository. Neither runs
executors: what is measured is the call, not the work it schedules. Prints ``name: value`` lines:

* ``api_status_query_us``: median ``GET /repositories/r1/images/{id}/status`` over the socket
  with one kept-alive httpx client; ``facade_status_query_us``: median ``get_image_status``
  called directly; ``api_status_query_ratio_vs_facade`` (target: the API's median < 1 ms);
* ``api_create_ms`` / ``facade_create_ms``: median ``create_virtual_disk`` round trip, through
  the API and directly; ``api_create_ratio_vs_facade`` (target <= 1.5);
* ``stream_lag_ms_median`` / ``stream_lag_ms_p99``: from the return of a ``create_virtual_disk``
  on host-b (its records durable in the shared log) to the disk's first event on host-a's
  ``GET /events`` stream, read by a thread of this process. host-a's engine notices another
  process's appends by inotify on a local file system, else within ``--poll`` seconds.

The server process is stopped at the end, and the work directory removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx
from _about import interpreter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20
REPO = "r1"


def serve(socket: str, repo_path: str, state_dir: str, poll: float) -> None:
    """The server process: host-a's engine behind uvicorn on ``socket``."""
    import uvicorn

    from engine import StorageEngine
    from strata_server.app import ConnectedNames, make_app

    engine = StorageEngine("host-a", state_dir=state_dir, run_executors=False, poll_interval=poll)
    engine.connect_storage_repository(REPO, "localfs-1.0", {"path": repo_path})
    app = make_app(engine, connected=ConnectedNames([REPO]))  # what strata serve runs

    try:
        uvicorn.run(app, uds=socket, log_level="warning")
    finally:
        engine.close()


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(call: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--calls", type=int, default=2000, help="status queries each side")
    parser.add_argument("--creates", type=int, default=200, help="disks created each side")
    parser.add_argument("--lag-samples", type=int, default=100)
    parser.add_argument("--poll", type=float, default=1.0, help="host-a's poll_interval")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        socket, repo_path, state_dir = args.serve
        serve(socket, repo_path, state_dir, args.poll)
        return 0

    from engine import StorageEngine

    work = tempfile.mkdtemp(prefix="sbs-", dir=args.dir)
    repo_path, socket = os.path.join(work, "r1"), os.path.join(work, "api.sock")
    os.mkdir(repo_path)
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    print(f"poll_interval: {args.poll}")
    engine = StorageEngine("host-b", state_dir=os.path.join(work, "b"), run_executors=False)
    server: subprocess.Popen[bytes] | None = None
    try:
        engine.create_storage_repository("localfs-1.0", {"path": repo_path})
        engine.connect_storage_repository(REPO, "localfs-1.0", {"path": repo_path})
        server = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--poll",
                str(args.poll),
                "--serve",
                socket,
                repo_path,
                os.path.join(work, "a"),
            ]
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(socket):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        transport = httpx.HTTPTransport(uds=socket)
        with httpx.Client(transport=transport, base_url="http://strata", timeout=30) as client:
            disk = engine.create_virtual_disk(REPO, 4 * MiB)
            url = f"/repositories/{REPO}/images/{disk}/status"
            while client.get(url).status_code != 200:  # host-a sees it within its poll
                time.sleep(0.05)

            def api_status() -> None:
                client.get(url).raise_for_status()

            timed(api_status, 200)  # warm-up, both sides
            timed(lambda: engine.get_image_status(REPO, disk), 200)
            api = median_us(timed(api_status, args.calls))
            direct = median_us(timed(lambda: engine.get_image_status(REPO, disk), args.calls))
            print(f"api_status_query_us: {api:.1f}")
            print(f"facade_status_query_us: {direct:.1f}")
            print(f"api_status_query_ratio_vs_facade: {api / direct:.2f}")

            def api_create() -> None:
                r = client.post(f"/repositories/{REPO}/images", json={"size": 4 * MiB})
                assert r.status_code == 201, r.text

            # Alternated, so that both sides meet the same log length and the same neighbours.
            api_times, direct_times = [], []
            for _ in range(args.creates):
                api_times += timed(api_create, 1)
                direct_times += timed(lambda: engine.create_virtual_disk(REPO, 4 * MiB), 1)
            api_c = statistics.median(api_times) * 1e3
            direct_c = statistics.median(direct_times) * 1e3
            print(f"api_create_ms: {api_c:.3f}")
            print(f"facade_create_ms: {direct_c:.3f}")
            print(f"api_create_ratio_vs_facade: {api_c / direct_c:.2f}")

            # host-a has seen every disk made so far: the stream starts from there.
            last = engine.create_virtual_disk(REPO, 4 * MiB)
            while client.get(f"/repositories/{REPO}/images/{last}/status").status_code != 200:
                time.sleep(0.05)
            lags, spans = stream_lags(client, engine, args.lag_samples)
            print(f"stream_lag_ms_median: {statistics.median(lags):.1f}")
            print(f"stream_lag_ms_p99: {p99(lags):.1f}")
            print(f"stream_lag_ms_max: {max(lags):.1f}")
            print(f"stream_lag_from_call_start_ms_median: {statistics.median(spans):.1f}")
            print(f"stream_lag_from_call_start_ms_p99: {p99(spans):.1f}")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def stream_lags(client: Any, engine: Any, samples: int) -> tuple[list[float], list[float]]:
    """Milliseconds from each create's return on host-b to its first event on the stream, and
    from the call's start (an event may come before the call returns: the append is durable
    before the call has caught host-b's own view up)."""
    arrived: dict[str, float] = {}
    cond = threading.Condition()
    ready = threading.Event()

    def read() -> None:
        with contextlib.suppress(httpx.HTTPError), client.stream("GET", "/events") as response:
            ready.set()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    image_id = json.loads(line[5:])["image_id"]
                    with cond:
                        arrived.setdefault(image_id, time.monotonic())
                        cond.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready.wait(30)
    time.sleep(0.5)  # subscribed
    lags: list[float] = []
    spans: list[float] = []
    rng = random.Random(1)
    for _ in range(samples):
        start = time.monotonic()
        image_id = engine.create_virtual_disk(REPO, 4 * MiB)
        done = time.monotonic()
        with cond:
            if not cond.wait_for(lambda i=image_id: i in arrived, timeout=30):  # type: ignore[misc]
                raise SystemExit(f"no event for {image_id} within 30 s ({len(lags)} measured)")
            lags.append((arrived[image_id] - done) * 1e3)
            spans.append((arrived[image_id] - start) * 1e3)
        time.sleep(rng.uniform(0.01, 0.05))  # separate appends, not one coalesced burst
    return lags, spans  # the reader ends with the server


if __name__ == "__main__":
    sys.exit(main())
