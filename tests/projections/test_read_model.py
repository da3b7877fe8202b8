"""The SQLite read model: a restart starts from it and reads only what is new; losing it, or
pointing it at another log, costs a rebuild that ends in the same state."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from engine.projections.folded_state import to_state
from engine.projections.status import image_status
from engine.projections.view import RepositoryView
from tests.projections.projection_log import Repo


def states(view: RepositoryView) -> dict[uuid.UUID, object]:
    return {i.id: (to_state(i), image_status(i, view)) for i in view.images()}


def rows(db: Path) -> dict[str, tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT id, status, stage, percent_complete, host_id FROM images")
        return {r[0]: tuple(r[1:]) for r in found}


def story(repo: Repo) -> dict[str, uuid.UUID]:
    disk = repo.disk(user_data={"name": "web01"})
    repo.run(disk)
    snap = repo.snapshot(disk)
    clone = repo.disk(base=snap)
    repo.fail(clone, "boom", "host-b")
    gone = repo.disk()
    repo.remove(gone)
    return {"disk": disk, "snap": snap, "clone": clone, "gone": gone}


def test_a_restart_loads_the_images_from_sqlite_and_reads_only_new_records(
    repo: Repo, tmp_path: Path
) -> None:
    db = tmp_path / "view.sqlite"
    ids = story(repo)
    first = repo.view(db)
    expected = states(first)
    first.close()

    again = RepositoryView(repo.app, db_path=str(db))
    assert again.records_read == 0
    assert again.position == first.position
    assert states(again) == expected
    assert again.catch_up() == first.position and again.records_read == 0

    repo.run(ids["disk"])  # claim + complete of the snapshot's overlay: two records
    again.catch_up()
    assert again.records_read == 2
    assert states(again) == states(repo.view())
    again.close()


def test_each_image_has_a_row_with_its_status_and_the_position_beside_it(
    repo: Repo, tmp_path: Path
) -> None:
    db = tmp_path / "view.sqlite"
    ids = story(repo)
    view = repo.view(db)
    view.close()
    found = rows(db)
    assert found[str(ids["disk"])] == ("broken", "1/1", -1, "host-a")  # new overlay pending
    assert found[str(ids["clone"])] == ("broken", "1/1", -1, "host-b")
    assert found[str(ids["snap"])] == ("optimized", "0/0", -1, "host-a")
    with sqlite3.connect(db) as conn:
        [(position,)] = conn.execute("SELECT position FROM tracking")
        [(removed,)] = conn.execute("SELECT removed FROM images WHERE id = ?", [str(ids["gone"])])
    assert (position, removed) == (view.position, 1)


def test_a_row_follows_a_change_of_another_image_it_depends_on(repo: Repo, tmp_path: Path) -> None:
    db = tmp_path / "view.sqlite"
    snap = repo.copied_snapshot()
    disk = repo.disk(base=snap)
    repo.run(disk)
    view = repo.view(db)
    assert rows(db)[str(disk)][0] == "broken"  # its base volume is still being copied in
    repo.run(snap)  # appends events of the snapshot only
    view.catch_up()
    assert rows(db)[str(disk)][0] == "optimized"
    view.close()


def test_deleting_the_database_rebuilds_the_same_states_from_the_log(
    repo: Repo, tmp_path: Path
) -> None:
    db = tmp_path / "view.sqlite"
    story(repo)
    view = repo.view(db)
    expected, position = states(view), view.position
    view.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    rebuilt = RepositoryView(repo.app, db_path=str(db))
    assert rebuilt.records_read == 0 and rebuilt.position == 0
    rebuilt.catch_up()
    assert rebuilt.records_read == position
    assert states(rebuilt) == expected
    rebuilt.close()


def test_a_database_ahead_of_the_log_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    db = tmp_path / "view.sqlite"
    long = Repo(tmp_path / "long")
    story(long)
    view = long.view(db)
    view.close()
    long.app.close()

    short = Repo(tmp_path / "short")  # the log was replaced by a shorter one
    disk = short.disk()
    replaced = RepositoryView(short.app, db_path=str(db))
    assert replaced.position == 0
    replaced.catch_up()
    assert [i.id for i in replaced.images()] == [disk]
    assert list(rows(db)) == [str(disk)]
    replaced.close()
    short.app.close()


def test_a_database_of_another_log_of_the_same_length_is_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "view.sqlite"
    first = Repo(tmp_path / "first")
    first.disk()
    first.view(db).close()
    first.app.close()

    second = Repo(tmp_path / "second")
    disk = second.disk()
    view = RepositoryView(second.app, db_path=str(db))
    view.catch_up()
    assert [i.id for i in view.images()] == [disk]
    view.close()
    second.app.close()


def test_a_database_written_for_another_version_of_the_aggregate_is_rebuilt(
    repo: Repo, tmp_path: Path
) -> None:
    db = tmp_path / "view.sqlite"
    story(repo)
    view = repo.view(db)
    expected = states(view)
    view.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tracking SET schema = 'an older layout'")
    again = RepositoryView(repo.app, db_path=str(db))
    assert again.position == 0
    again.catch_up()
    assert states(again) == expected
    again.close()


def test_a_database_file_that_is_not_a_database_any_more_is_replaced_and_rebuilt(
    repo: Repo, tmp_path: Path
) -> None:
    db = tmp_path / "view.sqlite"
    story(repo)
    expected = states(repo.view())
    db.write_bytes(b"this is no SQLite database, it was torn by a bad disk" * 100)
    view = RepositoryView(repo.app, db_path=str(db))
    view.catch_up()
    assert states(view) == expected
    view.close()
    assert RepositoryView(repo.app, db_path=str(db)).records_read == 0


def test_rebuild_folds_the_whole_log_again(repo: Repo, tmp_path: Path) -> None:
    story(repo)
    view = repo.view(tmp_path / "view.sqlite")
    expected, read = states(view), view.records_read
    assert view.rebuild() == view.position
    assert view.records_read == 2 * read
    assert states(view) == expected
    view.close()
