"""A log of many images in seconds, for the tools' behaviour on large repositories.

Events are made by the real aggregate and the application's mapper, and appended in large
transactions (as bench/replay.py does); no volume is written, so a disk whose create stage
completed is ``optimized`` and one whose stage never ran is ``broken``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.log import NewEvent, OperationLog
from engine.projections.log_events import new_mapper

HOST = "host-a"


def write_disks(log_dir: Path, made: int, broken: int) -> list[str]:
    """Append ``made`` disks that were created and ``broken`` ones whose create stage never
    ran; return the broken ones' ids."""
    mapper = new_mapper()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    images = []
    for n in range(made + broken):
        now = start + timedelta(milliseconds=n)
        top = ops.volume_ref(uuid.uuid4().hex, "qcow2")
        plan = ops.plan(uuid.uuid4().hex, "create", {"do": "create", "volume": top, "size": 1})
        disk = Image.request(
            image_id=uuid.uuid4(), kind=ops.VIRTUAL_DISK, size=2**30, chain=[top],
            user_data={"name": f"vm{n:05d}"}, strategy=ops.SPACE, auto_fix=True,
            origin={"how": "blank"}, operations=[plan], host_id=HOST, now=now,
        )  # fmt: skip
        if n < made:
            epoch = disk.claim(op_id=plan["op_id"], stage=0, host_id=HOST, now=now)
            disk.complete(op_id=plan["op_id"], stage=0, epoch=epoch, host_id=HOST, now=now)
        images.append(disk)
    events = [mapper.to_stored_event(e) for disk in images for e in disk.collect_events()]
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    with OperationLog.create(str(log_dir), HOST) as log:
        for k in range(0, len(events), 5000):
            log.append(
                [
                    NewEvent(s.originator_id, s.originator_version, s.topic, s.state)
                    for s in events[k : k + 5000]
                ]
            )
    return [str(disk.id) for disk in images[made:]]
