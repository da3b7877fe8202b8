"""A repository of many images: how long a check takes, how fast a status query answers.

    python bench/repository.py [--dir DIR] [--images N]

Prints ``name: value`` lines:

* ``check_seconds_10k_images``: ``check_storage_repository`` over a repository of 10,000 images
  (their volumes made by the executors, some removed so there is something to offer), median of
  3 (target <= 2). The baseline printed beside it is listing the volume directory with
  ``os.scandir`` + ``stat``, the least any check must do;
* ``status_query_us``: ``get_image_status`` on a warm engine, median over 20,000 calls
  (target <= 50); beside it, a dict lookup of the same ids as the floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from _about import interpreter

from engine import StorageEngine

MiB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="strata-bench-repo-", dir=args.dir)
    print(f"work_dir: {work}")
    print(f"interpreter: {interpreter()}")
    try:
        path = os.path.join(work, "repo1")
        os.mkdir(path)
        with StorageEngine(
            "bench", state_dir=os.path.join(work, "state"), poll_interval=0.05, workers=4
        ) as se:
            se.create_storage_repository("localfs-1.0", {"path": path})
            se.connect_storage_repository("r1", "localfs-1.0", {"path": path})
            t0 = time.perf_counter()
            images = [se.create_virtual_disk("r1", MiB) for _ in range(args.images)]
            for image in images:
                se.wait_for_image("r1", image, timeout=600)
            print(f"setup_seconds: {time.perf_counter() - t0:.1f}")
            for image in images[:: max(1, args.images // 100)]:
                se.remove_image("r1", image)

            checks, fixes = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                fixes = se.check_storage_repository("r1")
                checks.append(time.perf_counter() - t0)
            listing = []
            for _ in range(3):
                t0 = time.perf_counter()
                with os.scandir(os.path.join(path, "volumes")) as entries:
                    for entry in entries:
                        entry.stat()
                listing.append(time.perf_counter() - t0)
            print(f"images: {args.images}")
            print(f"fixes_offered: {len(fixes)}")
            print(f"scandir_stat_seconds: {statistics.median(listing):.3f}")
            print(f"check_seconds_10k_images: {statistics.median(checks):.3f}")

            live = [i for i in images if i not in set(images[:: max(1, args.images // 100)])]
            for image in live[:1000]:
                se.get_image_status("r1", image)  # warm
            samples = []
            for i in range(20_000):
                image = live[i % len(live)]
                t0 = time.perf_counter_ns()
                se.get_image_status("r1", image)
                samples.append(time.perf_counter_ns() - t0)
            table = {i: i for i in live}
            floor = []
            for i in range(20_000):
                image = live[i % len(live)]
                t0 = time.perf_counter_ns()
                table.get(image)
                floor.append(time.perf_counter_ns() - t0)
            print(f"dict_lookup_us: {statistics.median(floor) / 1e3:.2f}")
            print(f"status_query_us: {statistics.median(samples) / 1e3:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
