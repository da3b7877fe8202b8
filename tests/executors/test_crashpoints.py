"""A host killed -9 at any crash point of a stage: the next run brings the image where its
operation asked, with the data identical and one completion in the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.aggregates import operations as ops
from engine.errors import InvalidParameter
from engine.executors import crashpoints
from engine.executors.crashpoints import ENVIRONMENT_SWITCH, CrashPoints
from tests.executors.executor_repos import MiB, Repo, new_volume, qemu

CRASH_HOST = Path(__file__).with_name("crash_host.py")

# What the killed host left: (volume published, temporary file present, last event of the image).
LEFT_AT = {
    crashpoints.AFTER_CLAIM: (False, False, "StageClaimed"),
    crashpoints.BEFORE_DATA: (False, False, "StageClaimed"),
    # A copy's progress is its checkpoints (docs/adr/0032); it dies mid-copy before the first.
    crashpoints.MID_COPY: (False, True, "StageClaimed"),
    crashpoints.BEFORE_PUBLISH: (False, True, "StageCheckpointed"),
    crashpoints.AFTER_PUBLISH: (True, False, "StageCheckpointed"),
    crashpoints.AFTER_COMPLETION: (True, False, "StageCompleted"),
}


@pytest.mark.parametrize("point", crashpoints.NAMES)
def test_a_copy_killed_at_a_crash_point_is_finished_by_the_next_run(repo: Repo, point: str) -> None:
    source_ref = new_volume("qcow2")
    qemu.create(repo.path(source_ref), "qcow2", 16 * MiB)
    qemu.write_pattern(repo.path(source_ref), "qcow2", 0, 16 * MiB, 0x3C)
    source = repo.request(chain=[source_ref], size=16 * MiB, kind=ops.SNAPSHOT)
    copy = new_volume("qcow2")
    image = repo.request(
        {"do": "copy", "source_image": str(source), "volume": copy}, chain=[copy], size=16 * MiB
    )

    killed = subprocess.run(
        [sys.executable, str(CRASH_HOST), repo.storage.root, repo.host_id],
        env={**os.environ, ENVIRONMENT_SWITCH: point},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    left = (os.path.exists(repo.path(copy)), bool(repo.temporaries()), repo.topics(image)[-1])
    assert left == LEFT_AT[point]

    assert repo.executor().run_once() == (0 if point == crashpoints.AFTER_COMPLETION else 1)

    assert qemu.compare(repo.path(source_ref), repo.path(copy))
    assert repo.service.get(image).operations[0].state == ops.DONE
    assert repo.topics(image).count("StageCompleted") == 1
    assert repo.temporaries() == []


def test_crash_points_do_nothing_unless_armed_and_an_unknown_name_is_refused() -> None:
    crashed: list[str] = []
    armed = CrashPoints(crashpoints.BEFORE_PUBLISH, crash=lambda: crashed.append("now"))

    armed(crashpoints.AFTER_CLAIM)
    armed(crashpoints.BEFORE_PUBLISH)

    assert crashed == ["now"]
    assert CrashPoints.from_environ({}).armed is None
    with pytest.raises(InvalidParameter, match="STRATA_CRASH_AT"):
        CrashPoints.from_environ({ENVIRONMENT_SWITCH: "stage.nowhere"})
