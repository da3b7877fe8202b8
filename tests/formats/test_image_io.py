"""Reading and writing images through a private qemu-nbd (engine/formats/qemu/image_io.py,
nbd.py): real images, real servers, and that no server outlives its user, even a killed one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.errors import QemuError
from engine.formats.qemu.image_io import open_reader, open_writer

MiB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def servers_of(path: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{path}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", str(base))
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 512k 64k", str(top))
    return top


def test_a_reader_reads_through_the_chain_and_maps_data_and_depth(overlay: Path) -> None:
    with open_reader(str(overlay), "qcow2") as reader:
        assert reader.size == 8 * MiB
        assert reader.read(0, 4) == b"AAAA"
        assert reader.read(512 * 1024, 4) == b"BBBB"
        assert reader.read(2 * MiB, 4) == bytes(4)
        extents = reader.extents()
        assert sum(e.length for e in extents) == 8 * MiB
        own = [(e.start, e.length) for e in extents if e.depth == 0 and e.present]
        assert own == [(512 * 1024, 65536)]
        assert not any(e.data for e in extents if e.start >= MiB)
        pieces = list(reader.blocks(0, 8 * MiB, block=256 * 1024))
        assert sum(p if isinstance(p, int) else len(p) for _, p in pieces) == 8 * MiB
    assert servers_of(overlay) == []


def test_a_writer_writes_zeroes_and_flushes_and_counts_its_bytes(tmp_path: Path) -> None:
    for fmt in ("raw", "qcow2"):
        path = tmp_path / f"out.{fmt}"
        run("qemu-img", "create", "-f", fmt, str(path), "4M")
        with open_writer(str(path), fmt) as writer:
            writer.write(MiB, b"\x07" * MiB)
            writer.write_zeroes(MiB, 4096)
            writer.flush()
            counters = writer.io_counters()
        assert counters["wchar"] >= MiB - 4096
        with open_reader(str(path), fmt) as reader:
            assert reader.read(MiB, 4096) == bytes(4096)
            assert reader.read(MiB + 4096, 4) == b"\x07" * 4
        assert servers_of(path) == []


def test_a_second_writer_of_one_file_is_refused_by_qemus_lock(tmp_path: Path) -> None:
    path = tmp_path / "locked.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(path), "1M")
    with open_writer(str(path), "qcow2"):
        with pytest.raises(QemuError) as e:
            open_writer(str(path), "qcow2")
        assert "lock" in e.value.stderr
    assert servers_of(path) == []


def test_no_server_outlives_a_killed_user(tmp_path: Path) -> None:
    path = tmp_path / "orphan.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(path), "1M")
    script = textwrap.dedent(f"""
        import time
        from engine.formats.qemu.image_io import open_writer
        w = open_writer({str(path)!r}, "qcow2")
        print("open", flush=True)
        time.sleep(60)
    """)
    user = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout is not None and user.stdout.readline() == "open\n"
        assert servers_of(path)
        os.kill(user.pid, signal.SIGKILL)
        user.wait()
        deadline = time.monotonic() + 10
        while servers_of(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servers_of(path) == []
    finally:
        user.kill()
        user.wait()
        for pid in servers_of(path):
            os.kill(pid, signal.SIGKILL)
