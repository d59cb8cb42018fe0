"""Multiline joining, sans-I/O: presets on recorded traces, streams apart, positions exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.config import config_from_dict
from forwarder.multiline import PRESETS, Joiner, Limits, MultilineRules, custom_grammar
from forwarder.records import ContainerInfo, LogLine, Position
from tests.helpers import CID

DATA = Path(__file__).parent / "data" / "multiline"
T0 = 1_700_000_000_000_000_000

# Each recorded trace: which of its lines (1-based, inclusive) become one record.
TRACES = {
    "java": [(1, 1), (2, 2), (3, 19), (20, 20)],
    "python": [(1, 1), (2, 24), (25, 25)],
    "go": [(1, 1), (2, 19), (20, 20)],
    "ruby": [(1, 1), (2, 7), (8, 8)],
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(name: str, source: str = "stderr") -> list[LogLine]:
    texts = (DATA / f"{name}.log").read_text().splitlines()
    return [LogLine(source, T0 + i, text) for i, text in enumerate(texts)]


def joiner(grammar: str = "java", clock: Clock | None = None, **limits: float) -> Joiner:
    return Joiner(PRESETS[grammar], Limits(**limits), None, clock or Clock())  # type: ignore[arg-type]


def run(j: Joiner, lines: list[LogLine], batch: int) -> list[LogLine]:
    out: list[LogLine] = []
    for i in range(0, len(lines), batch):
        part = lines[i : i + batch]
        records, _ = j.feed(part, Position(part[-1].ts_ns, 1))
        out += records
    return out + j.flush()[0]


@pytest.mark.parametrize("batch", [1, 3, 1000])
@pytest.mark.parametrize("preset", sorted(TRACES))
def test_each_preset_joins_its_recorded_trace(preset: str, batch: int) -> None:
    lines = lines_of(preset)
    records = run(joiner(preset), lines, batch)
    expected = [
        LogLine("stderr", T0 + a - 1, "\n".join(line.text for line in lines[a - 1 : b]))
        for a, b in TRACES[preset]
    ]
    assert records == expected


def test_ordinary_lines_go_through_one_by_one() -> None:
    lines = [LogLine("stdout", T0 + i, f"plain {i}") for i in range(100)]
    for preset in PRESETS:
        assert run(joiner(preset), lines, 7) == lines


def test_groups_never_mix_stdout_and_stderr() -> None:
    out = [LogLine("stdout", T0, "Exception in thread main"), LogLine("stdout", T0 + 2, "\tat a.B")]
    err = [LogLine("stderr", T0 + 1, "boom"), LogLine("stderr", T0 + 3, "\tat c.D")]
    interleaved = [out[0], err[0], out[1], err[1]]
    records = run(joiner("java"), interleaved, 4)
    assert sorted(records) == sorted(
        [
            LogLine("stdout", T0, "Exception in thread main\n\tat a.B"),
            LogLine("stderr", T0 + 1, "boom\n\tat c.D"),
        ]
    )


def test_the_position_stays_before_a_pending_group() -> None:
    lines = lines_of("java")
    j = joiner("java")
    # Up to the middle of the trace: lines 1 and 2 are sent, the trace is pending.
    records, safe = j.feed(lines[:10], Position(T0 + 9, 1))
    assert [r.text for r in records] == [lines[0].text, lines[1].text]
    assert safe == Position(T0 + 1, 1)  # after line 2, before line 3 (the trace's first)
    records, safe = j.feed(lines[10:], Position(T0 + 19, 1))
    assert len(records) == 1
    assert records[0].text.startswith("org.springframework")
    assert safe == Position(T0 + 18, 1)  # before line 20, which waits for what follows
    assert j.flush() == ([lines[19]], Position(T0 + 19, 1))


def test_a_restart_in_the_middle_of_a_group_reads_it_again_from_its_first_line() -> None:
    """The resumed follower is handed the safe position: it re-reads from the group's first
    line, and the records of both runs together are each trace once, nothing half."""
    lines = lines_of("python")
    j = joiner("python")
    first, safe = j.feed(lines[:6], Position(lines[5].ts_ns, 1))
    assert safe is not None
    # The engine's since is inclusive; the resume filter drops `taken` lines at safe.ts_ns.
    rest = [line for line in lines if line.ts_ns > safe.ts_ns]
    again = run(joiner("python"), rest, 5)
    assert first + again == run(joiner("python"), lines, 1000)


def test_lines_of_one_nanosecond_count_in_the_position() -> None:
    same = [LogLine("stdout", T0, "a"), LogLine("stdout", T0, "b"), LogLine("stdout", T0, "c")]
    j = joiner("java")
    records, safe = j.feed(same, Position(T0, 3))
    assert records == same[:2]
    assert safe == Position(T0, 2)


def test_flush_timeout_sends_a_pending_group_as_it_is() -> None:
    clock = Clock()
    j = joiner("go", clock, flush_timeout_s=1.0)
    lines = lines_of("go")
    j.feed(lines[:4], Position(lines[3].ts_ns, 1))
    assert j.deadline() == 1.0
    clock.now = 0.5
    assert j.due() == ([], Position(lines[0].ts_ns, 1))
    clock.now = 1.0
    records, safe = j.due()
    # The tentative blank line is not part of the group: it goes on its own.
    assert [r.text for r in records] == ["\n".join(x.text for x in lines[1:3]), ""]
    assert safe == Position(lines[3].ts_ns, 1)
    assert j.deadline() is None


def test_max_lines_and_max_bytes_cut_a_group() -> None:
    lines = [LogLine("stdout", T0, "head")] + [
        LogLine("stdout", T0 + i, "\tat x") for i in (1, 2, 3, 4)
    ]
    records = run(joiner("java", max_lines=2), lines, 100)
    assert [r.text for r in records] == ["head\n\tat x", "\tat x\n\tat x", "\tat x"]
    records = run(joiner("java", max_bytes=12), lines, 100)
    assert [r.text for r in records] == ["head\n\tat x", "\tat x\n\tat x", "\tat x"]


def test_custom_start_pattern_alone() -> None:
    grammar = custom_grammar(r"^\d{4}-\d{2}-\d{2} ", None)
    j = Joiner(grammar, Limits(), None, Clock())
    texts = ["noise", "2024-05-14 a", "  more", "x", "2024-05-14 b", "2024-05-14 c"]
    lines = [LogLine("stdout", T0 + i, t) for i, t in enumerate(texts)]
    assert [r.text for r in run(j, lines, 2)] == [
        "noise",
        "2024-05-14 a\n  more\nx",
        "2024-05-14 b",
        "2024-05-14 c",
    ]


def test_custom_start_and_continue_patterns() -> None:
    grammar = custom_grammar(r"^ERROR", r"^\s")
    j = Joiner(grammar, Limits(), None, Clock())
    texts = ["ERROR x", " detail", "plain", " stray", "ERROR y"]
    lines = [LogLine("stdout", T0 + i, t) for i, t in enumerate(texts)]
    assert [r.text for r in run(j, lines, 10)] == [
        "ERROR x\n detail",
        "plain",
        " stray",
        "ERROR y",
    ]


def test_rules_and_the_label_choose_a_containers_grammar() -> None:
    config = config_from_dict(
        {"multiline": [{"match": {"image": "javaapp*"}, "preset": "java", "max_lines": 9}]},
        env={},
    )
    rules = MultilineRules.from_config(config, Clock())
    java = ContainerInfo(id=CID, name="/a", image="javaapp:1")
    assert (found := rules.joiner(java, None)) is not None
    assert found.grammar is PRESETS["java"]
    assert found.limits.max_lines == 9
    assert rules.joiner(ContainerInfo(id=CID, name="/b", image="nginx"), None) is None
    labelled = ContainerInfo(id=CID, name="/c", image="x", labels={"forwarder.multiline": "go"})
    assert (found := rules.joiner(labelled, None)) is not None
    assert found.grammar is PRESETS["go"]
