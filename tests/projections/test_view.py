"""The repository view folds the log into images with the aggregate's own apply, reads only what
is new, answers who uses and who makes each volume, and is safe to share between threads."""

from __future__ import annotations

import threading
from pathlib import Path

from engine.aggregates import operations as ops
from engine.aggregates.image import Image
from engine.projections.folded_state import to_state
from engine.projections.view import RepositoryView
from tests.projections.projection_log import Repo


def test_the_view_holds_the_same_state_as_the_aggregate_loaded_from_the_log(repo: Repo) -> None:
    disk = repo.disk(user_data={"name": "web01"})
    repo.run(disk)
    snap = repo.snapshot(disk)
    repo.remove(snap)
    view = repo.view()
    for image_id in (disk, snap):
        folded = view.image(image_id)
        assert folded is not None
        assert to_state(folded) == to_state(repo.get(image_id))
    assert view.repository is not None
    assert (view.repository.format_name, view.repository.created_by) == ("localfs", "host-a")


def test_catching_up_reads_only_the_records_appended_since(repo: Repo) -> None:
    disk = repo.disk()
    view = repo.view()
    read, position = view.records_read, view.position
    assert view.catch_up() == position
    assert view.records_read == read  # nothing new: nothing read
    repo.claim(disk)
    assert view.catch_up() == position + 1
    assert view.records_read == read + 1
    op = view.image(disk).current_operation()  # type: ignore[union-attr]
    assert op is not None and op.claim_host == "host-a"


def test_a_view_without_refresh_still_sees_this_process_s_own_saves(repo: Repo) -> None:
    view = repo.view()
    disk = repo.disk()
    view.catch_up(refresh=False)
    assert view.image(disk) is not None


def test_a_view_sees_what_another_host_appended_to_the_shared_log(repo: Repo) -> None:
    view = repo.view()
    other = Repo(Path(repo.config.log_dir), "host-b", create=False)
    try:
        disk = other.disk()
    finally:
        other.app.close()
    view.catch_up()
    image = view.image(disk)
    assert image is not None and image.created_by == "host-b"


def test_an_image_a_query_returned_never_changes_afterwards(repo: Repo) -> None:
    disk = repo.disk()
    view = repo.view()
    before = view.image(disk)
    assert before is not None
    repo.run(disk)
    view.catch_up()
    after = view.image(disk)
    assert after is not None
    assert before.operations[0].state == ops.PENDING
    assert after.operations[0].state == ops.DONE
    assert before.version < after.version


def test_volume_users_producers_and_readiness(repo: Repo) -> None:
    disk = repo.disk()
    view = repo.view()
    [base] = view.image(disk).chain  # type: ignore[union-attr]
    assert view.producer_of(base).id == disk  # type: ignore[union-attr]
    assert not view.is_ready(base)
    repo.run(disk)
    snap = repo.snapshot(disk)
    clone = repo.disk(base=snap)
    repo.remove(snap)
    view.catch_up()
    assert view.is_ready(base) and view.producer_of(base) is None
    assert [i.id for i in view.users_of(base)] == sorted([disk, snap, clone], key=str)
    assert {i.id for i in view.live_users_of(base)} == {disk, clone}
    top = view.image(disk).chain[-1]  # type: ignore[union-attr]
    assert view.producer_of(top).id == disk  # type: ignore[union-attr]
    live = view.referenced_volumes(live_only=True)
    assert base in live and top in live
    assert view.referenced_volumes(live_only=False) >= live
    assert {i.id for i in view.live_images()} == {disk, clone}
    assert len(view.images()) == 3


def test_a_removed_image_s_volume_is_referenced_only_counting_removed_images(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    repo.remove(disk)
    view = repo.view()
    [volume] = view.image(disk).chain  # type: ignore[union-attr]
    assert volume not in view.referenced_volumes(live_only=True)
    assert volume in view.referenced_volumes(live_only=False)


def test_history_lists_an_image_s_events_oldest_first(repo: Repo) -> None:
    disk = repo.disk()
    repo.run(disk)
    view = repo.view()
    kinds = [type(e).__name__ for e in view.history(disk)]
    assert kinds == ["ImageRequested", "StageClaimed", "StageCompleted"]
    assert all(isinstance(e, Image.Event) for e in view.history(str(disk)))


def test_an_id_that_is_not_an_image_id_finds_nothing(repo: Repo) -> None:
    view = repo.view()
    assert view.image("../etc/passwd") is None


def test_threads_catching_up_while_others_append_end_with_the_log_s_state(repo: Repo) -> None:
    view = RepositoryView(repo.app, batch_size=3)
    disks = [repo.disk() for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def follow() -> None:
        try:
            while not stop.is_set():
                view.catch_up()
                for image in view.images():
                    image.current_operation()  # reading while another thread folds
        except BaseException as e:
            errors.append(e)

    followers = [threading.Thread(target=follow) for _ in range(3)]
    for t in followers:
        t.start()
    workers = [threading.Thread(target=repo.run, args=(d,)) for d in disks]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in followers:
        t.join()
    assert errors == []
    view.catch_up()
    fresh = repo.view()
    for disk in disks:
        assert to_state(view.image(disk)) == to_state(fresh.image(disk))  # type: ignore[arg-type]
        assert view.image(disk).current_operation() is None  # type: ignore[union-attr]
