"""The pure parts of the json-file source: which source reads a container, byte positions
beside (ts, taken), and how they are saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.checkpoint import PositionStore, PositionTracker, SavedState
from forwarder.docker.containers import ContainerTable, Follow, Skip, choose_source
from forwarder.docker.filesource import log_file_path
from forwarder.docker.follower import FilePlace
from forwarder.docker.logsource import FileMark
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position

A = ContainerId("aa" * 32)
LOG_PATH = f"/var/lib/docker/containers/{A}/{A}-json.log"


def container(driver: str = "json-file", log_path: str = LOG_PATH) -> ContainerInfo:
    return ContainerInfo(id=A, name="/web", running=True, log_driver=driver, log_path=log_path)


@pytest.mark.parametrize(
    ("mode", "driver", "local", "readable", "chosen"),
    [
        ("auto", "json-file", True, True, "file"),
        ("auto", "json-file", True, False, "api"),
        ("auto", "json-file", False, True, "api"),
        ("auto", "journald", True, True, "api"),
        ("file", "json-file", True, True, "file"),
        ("file", "json-file", True, False, None),
        ("file", "local", True, True, None),
        ("file", "json-file", False, True, None),
        ("api", "json-file", True, True, "api"),
    ],
)
def test_source_choice(
    mode: str, driver: str, local: bool, readable: bool, chosen: str | None
) -> None:
    source, _why = choose_source(
        container(driver),
        mode,  # type: ignore[arg-type]
        local=local,
        readable=readable,
    )
    assert source == chosen


def test_the_reason_names_what_is_missing() -> None:
    assert choose_source(container("local"), "auto", local=True, readable=True)[1] == (
        "its log driver is 'local', not json-file"
    )


def table(mode: str) -> ContainerTable:
    return ContainerTable(
        positions={},
        first_start=False,
        last_run_ns=None,
        read_from_tail=False,
        exclude_label="forwarder.exclude",
        self_id=None,
        log_source=mode,  # type: ignore[arg-type]
    )


def test_the_table_follows_a_readable_json_file_container_from_disk() -> None:
    t = table("auto")
    actions = t.on_inspected(A, container(), log_readable=True)
    follows = [a for a in actions if isinstance(a, Follow)]
    assert [f.source for f in follows] == ["file"]


def test_the_table_keeps_a_containers_source_when_it_follows_it_again() -> None:
    from forwarder.docker.containers import EndReason, FollowerEnded

    t = table("auto")
    t.on_inspected(A, container(), log_readable=True)
    again = t.on_follower_ended(FollowerEnded(A, 0, EndReason.BROKE, Position(5, 1)))
    assert [a.source for a in again if isinstance(a, Follow)] == ["file"]


def test_file_mode_skips_an_unreadable_container_as_an_error() -> None:
    t = table("file")
    actions = t.on_inspected(A, container(), log_readable=False)
    assert actions == [
        Skip(
            container(),
            f'log_source = "file" and its log file {LOG_PATH} can\'t be read',
            error=True,
        )
    ]


def test_containers_dir_maps_the_engines_log_path() -> None:
    assert log_file_path(LOG_PATH, "") == Path(LOG_PATH)
    assert log_file_path(LOG_PATH, "/host/containers") == Path(f"/host/containers/{A}/{A}-json.log")


# --- positions ------------------------------------------------------------------------------


def lines(*stamps: int) -> list[LogLine]:
    return [LogLine("stdout", ts, f"l{ts}") for ts in stamps]


def test_a_position_stays_at_the_offset_where_the_joiner_last_held_nothing() -> None:
    place = FilePlace()
    assert place.moved(FileMark(1, 2, 3, 100), lines(1, 2), joiner_idle=True) == lines(1, 2)
    assert place.position(Position(2, 1)) == Position(2, 1, 1, 2, 3, 100, 0)
    # A long line's first piece is pending: the lines before it are taken, the offset stays.
    place.moved(FileMark(1, 2, 3, 300), lines(3), joiner_idle=False)
    assert place.position(Position(3, 1)) == Position(3, 1, 1, 2, 3, 100, 1)
    place.moved(FileMark(1, 2, 3, 400), lines(4, 5), joiner_idle=False)
    assert place.position(Position(5, 1)) == Position(5, 1, 1, 2, 3, 100, 3)
    place.moved(FileMark(1, 2, 3, 500), [], joiner_idle=True)
    assert place.position(Position(5, 1)) == Position(5, 1, 1, 2, 3, 500, 0)


def test_a_resume_at_a_byte_drops_the_lines_counted_after_it() -> None:
    place = FilePlace()
    place.resumed(Position(3, 1, 1, 2, 3, 100, 2))
    assert place.moved(FileMark(1, 2, 3, 200), lines(1), joiner_idle=False) == []
    assert place.moved(FileMark(1, 2, 3, 300), lines(2, 3), joiner_idle=True) == lines(3)
    assert place.position(Position(3, 1)) == Position(3, 1, 1, 2, 3, 300, 0)


def test_position_order_and_saved_form() -> None:
    plain = Position(10, 2)
    in_file = Position(10, 2, 1, 2, -1, 500, 0)
    assert in_file.later_than(plain)
    assert not plain.later_than(plain)
    assert Position(11, 1).later_than(in_file)
    assert plain.to_list() == [10, 2]
    assert Position.from_list(in_file.to_list()) == in_file
    assert Position.from_list([10, 2]) == plain


def test_the_tracker_commits_a_file_position_at_the_same_time_and_count() -> None:
    tracker = PositionTracker({A: Position(10, 2)})
    tracker.sealed(1, {A: Position(10, 2, 1, 2, 3, 700, 0)})
    assert tracker.delivered(1)
    assert tracker.committed[A].offset == 700


def test_positions_file_keeps_file_parts_and_reads_the_old_form(tmp_path: Path) -> None:
    store = PositionStore(tmp_path)
    saved = {A: Position(1_700_000_000_123_456_789, 2, 64769, 1234, 99, 4096, 1)}
    store.save(saved, now_ns=42, engine_seen_ns=40)
    assert store.load() == SavedState(saved, 40)
    store.path.write_text(f'{{"positions": {{"{A}": [10, 1]}}, "engine_seen_ns": 5}}')
    assert store.load() == SavedState({A: Position(10, 1)}, 5)
