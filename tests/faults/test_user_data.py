"""User data is data (architecture §6), end to end: what a caller stores through the facade comes
back exactly, on this host and on another one reading the log, and the log stays sound; what could
not come back exactly is refused before anything is appended (architecture §7)."""

from __future__ import annotations

import enum
import json
import math
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from engine import StorageEngine, validation
from engine.errors import InvalidParameter
from engine.log.reader import ReadOnlyLog
from engine.persistence.transcoder import default_transcoder
from engine.validation import MAX_USER_DATA_DEPTH
from log_tools.render import state_preview
from tests.persistence.user_data_values import USER_DATA, exact

MiB = 2**20

# The cases: a wrapper no host could decode, and ones that used to change the value.
WRAPPERS = [
    {"_type_": "no_such", "_data_": 1},
    {"_type_": "uuid_hex", "_data_": "0123456789abcdef0123456789abcdef"},
    {"_type_": "decimal_str", "_data_": "1.50"},
    {"vm": {"disks": [{"_type_": "tuple_as_list", "_data_": [1, 2]}]}},
    {"_data_": None, "_type_": "datetime_iso"},
]
ODD_VALUES = [
    {"int": [2**64 - 1, -(2**63), 0, -1], "float": [math.nan, -0.0, math.inf], "b": b"\x00\xff"},
    {1: "int key", b"k": "bytes key", None: "none key", 2.5: "float key", False: "bool key"},
    "a plain string",
    [[[[[]]]]],
]


@pytest.fixture
def repo_path(tmp_path: Path) -> str:
    path = tmp_path / "repo"
    path.mkdir()
    return str(path)


@pytest.fixture
def engines(tmp_path: Path, repo_path: str) -> Iterator[tuple[StorageEngine, StorageEngine]]:
    """Two hosts on one repository; no executors: user data needs no stage to run."""
    with (
        StorageEngine("host-a", state_dir=str(tmp_path / "a"), run_executors=False) as a,
        StorageEngine("host-b", state_dir=str(tmp_path / "b"), run_executors=False) as b,
    ):
        a.create_storage_repository("localfs-1.0", {"path": repo_path})
        for engine in (a, b):
            engine.connect_storage_repository("r1", "localfs-1.0", {"path": repo_path})
        yield a, b


def last_seq(repo_path: str) -> int:
    *_, last = ReadOnlyLog(str(Path(repo_path) / "log")).records()
    return last.seq


def user_data_seen(engine: StorageEngine, image_id: str, expected: Any) -> Any:
    """The image's user data once ``engine`` shows ``expected`` (another host follows the log
    in the background), or what it shows after ten seconds."""
    deadline = time.monotonic() + 10
    while True:
        got = engine.get_image_info("r1", image_id).user_data
        if exact(got) == exact(expected) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def strata_log(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "log_tools", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def verify(repo_path: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(strata_log("verify", repo_path, "--json"))
    return report


@pytest.mark.parametrize("value", WRAPPERS + ODD_VALUES, ids=repr)
def test_user_data_comes_back_exactly_here_on_another_host_and_the_log_is_sound(
    engines: tuple[StorageEngine, StorageEngine], repo_path: str, value: Any
) -> None:
    a, b = engines
    created = a.create_virtual_disk("r1", MiB, user_data=value)
    changed = a.create_virtual_disk("r1", MiB, user_data={"first": 1})
    a.set_user_data("r1", changed, value)

    for engine in (a, b):
        for image_id in (created, changed):
            assert exact(user_data_seen(engine, image_id, value)) == exact(value)
        listed = {i.image_id: i.user_data for i in engine.list_images("r1")}
        assert exact(listed[created]) == exact(listed[changed]) == exact(value)

    report = verify(repo_path)
    assert report["status"] == "sound"
    assert report["damage"] is None
    assert report["last_seq"] == last_seq(repo_path)


def test_the_log_tools_show_user_data_as_given(
    engines: tuple[StorageEngine, StorageEngine], repo_path: str
) -> None:
    a, _ = engines
    for value in (WRAPPERS[0], ODD_VALUES[1]):
        image_id = a.create_virtual_disk("r1", MiB, user_data=value)
        entries = [
            json.loads(line)
            for line in strata_log("history", repo_path, image_id, "--json").splitlines()
        ]
        assert entries[0]["event"] == "ImageRequested"
        assert entries[0]["changed"]["user_data"][1] == entries[0]["fields"]["user_data"]
        assert "Opaque(" in strata_log("history", repo_path, image_id)
    assert entries[0]["fields"]["user_data"] == {
        "1": "int key",
        "b'k'": "bytes key",
        "null": "none key",
        "2.5": "float key",
        "false": "bool key",
    }


def test_a_dumped_records_preview_shows_user_data_as_given() -> None:
    codec = default_transcoder()
    state = codec.encode({"user_data": validation.user_data(WRAPPERS[0])})
    assert state_preview(state).endswith(
        "{'user_data': Opaque({'_type_': 'no_such', '_data_': 1})}"
    )


def test_a_fresh_host_reads_user_data_from_the_log_alone(tmp_path: Path, repo_path: str) -> None:
    with StorageEngine("host-a", state_dir=str(tmp_path / "a"), run_executors=False) as a:
        a.create_storage_repository("localfs-1.0", {"path": repo_path})
        a.connect_storage_repository("r1", "localfs-1.0", {"path": repo_path})
        ids = [a.create_virtual_disk("r1", MiB, user_data=value) for value in WRAPPERS]
    with StorageEngine("host-c", state_dir=str(tmp_path / "c"), run_executors=False) as c:
        c.connect_storage_repository("r1", "localfs-1.0", {"path": repo_path})
        got = [c.get_image_info("r1", image_id).user_data for image_id in ids]
    assert got == WRAPPERS


def test_a_dict_subclass_is_kept_as_the_dict_it_is(
    engines: tuple[StorageEngine, StorageEngine],
) -> None:
    a, b = engines
    image_id = a.create_virtual_disk("r1", MiB, user_data=OrderedDict([("z", 1), ("a", 2)]))
    got = b.get_image_info("r1", image_id).user_data
    assert type(got) is dict and list(got.items()) == [("z", 1), ("a", 2)]


@given(value=USER_DATA)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_any_value_strata_takes_comes_back_exactly_on_another_host(
    engines: tuple[StorageEngine, StorageEngine], value: Any
) -> None:
    a, b = engines
    image_id = a.create_virtual_disk("r1", MiB, user_data=value)
    assert exact(a.get_image_info("r1", image_id).user_data) == exact(value)
    assert exact(b.get_image_info("r1", image_id).user_data) == exact(value)


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _cycle() -> list[Any]:
    cycle: list[Any] = []
    cycle.append(cycle)
    return cycle


# Each bad value, and words the refusal must hold: what to give instead.
REFUSED = [
    (Colour.RED, "int(...)"),
    ({"colour": Colour.RED}, "int(...)"),
    (Name("web01"), "str(...)"),
    ({"name": [Name("web01")]}, "str(...)"),
    ((1, 2), "lists, not tuples"),
    ({"t": [(1, 2)]}, "lists, not tuples"),
    (bytearray(b"x"), "bytes(...)"),
    ({"s": {1, 2}}, "lists and dicts"),
    ({"o": object()}, "lists and dicts"),
    ({(1, 2): "tuple key"}, "dict keys"),
    ({frozenset(): "frozenset key"}, "dict keys"),
    (2**64, "-2**63 to 2**64-1"),
    ([-(2**63) - 1], "-2**63 to 2**64-1"),
    (_nested(MAX_USER_DATA_DEPTH + 1), f"at most {MAX_USER_DATA_DEPTH} deep"),
    (_cycle(), f"at most {MAX_USER_DATA_DEPTH} deep"),
    ("x" * 100_000, "at most 65536 bytes"),
]


@pytest.mark.parametrize(("value", "says"), REFUSED, ids=[s for _, s in REFUSED])
def test_user_data_that_would_not_come_back_exactly_is_refused_before_anything_is_appended(
    engines: tuple[StorageEngine, StorageEngine], repo_path: str, value: Any, says: str
) -> None:
    a, _ = engines
    image_id = a.create_virtual_disk("r1", MiB, user_data={"kept": True})
    before = last_seq(repo_path)
    with pytest.raises(InvalidParameter, match="user_data") as created:
        a.create_virtual_disk("r1", MiB, user_data=value)
    with pytest.raises(InvalidParameter, match="user_data") as set_:
        a.set_user_data("r1", image_id, value)
    for refusal in (created, set_):
        assert says in str(refusal.value)
    assert last_seq(repo_path) == before
    assert a.get_image_info("r1", image_id).user_data == {"kept": True}


def test_nesting_up_to_the_limit_is_taken(engines: tuple[StorageEngine, StorageEngine]) -> None:
    a, b = engines
    deepest = _nested(MAX_USER_DATA_DEPTH)
    image_id = a.create_virtual_disk("r1", MiB, user_data=deepest)
    assert b.get_image_info("r1", image_id).user_data == deepest
