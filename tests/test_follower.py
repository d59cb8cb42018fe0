"""Resume positions and self-detection, without an engine."""

from __future__ import annotations

from pathlib import Path

from forwarder.docker.discovery import self_container_id
from forwarder.docker.follower import ResumeFilter, advance
from forwarder.docker.frames import LogLine
from forwarder.events import Position


def lines(*stamps: int) -> list[LogLine]:
    return [LogLine("stdout", ts, f"l{i}") for i, ts in enumerate(stamps)]


def test_advance_counts_lines_at_the_newest_nanosecond() -> None:
    assert advance(None, []) is None
    assert advance(None, lines(1, 2, 2)) == Position(2, 2)
    assert advance(Position(2, 2), lines(2, 2)) == Position(2, 4)
    assert advance(Position(5, 1), lines(3)) == Position(5, 1)  # never backwards


def test_resume_skips_exactly_the_lines_taken_at_the_position() -> None:
    batch = lines(10, 10, 10, 11)
    resume = ResumeFilter(Position(10, 2))
    assert [line.text for line in resume.feed(batch)] == ["l2", "l3"]
    assert not resume.active
    assert resume.feed(batch) == batch  # past the position, everything is new


def test_resume_across_batches() -> None:
    resume = ResumeFilter(Position(10, 3))
    assert resume.feed(lines(10, 10)) == []
    assert [line.ts_ns for line in resume.feed(lines(10, 10, 12))] == [10, 12]


def test_every_position_resumes_exactly() -> None:
    stream = lines(1, 2, 2, 2, 3, 4, 4, 5)
    for cut in range(len(stream) + 1):
        position = advance(None, stream[:cut])
        rest = ResumeFilter(position).feed(
            [line for line in stream if position is None or line.ts_ns >= position.ts_ns]
        )
        assert stream[:cut] + rest == stream, cut


def test_self_container_id_from_cgroup_and_mountinfo(tmp_path: Path) -> None:
    cid = "ab" * 32
    (tmp_path / "cgroup").write_text(f"12:memory:/docker/{cid}\n0::/\n")
    assert self_container_id(tmp_path) == cid
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "mountinfo").write_text(
        f"1 2 0:3 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4 x rw\n"
    )
    assert self_container_id(tmp_path) == cid
    (tmp_path / "mountinfo").write_text("1 2 0:3 / / rw - ext4 x rw\n")
    assert self_container_id(tmp_path) is None
