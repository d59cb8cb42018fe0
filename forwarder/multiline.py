"""Multiline: the lines of one event (a stack trace) joined into one record (sans-I/O).

A :class:`Joiner` per container keeps one pending group per stream, so stdout and stderr never
mix. A group becomes one :class:`~forwarder.records.LogLine` whose text is its lines joined
with ``"\\n"`` and whose time is its first line's. It is sent when a line that does not continue
it comes, when it reaches ``max_lines`` or ``max_bytes``, after ``flush_timeout`` without a new
line (:meth:`Joiner.due`, called by the follower), or at the end of the stream.

**Positions stay exact.** :meth:`Joiner.feed` returns the position *before the first line of
the earliest pending group* (or the batch's position when nothing is pending): a restart in the
middle of a group reads the group again from its first line, and nothing is half-sent.

A :class:`Grammar` is a small state machine: a line matching ``start`` (any line, when None)
opens a group; in a group, the transitions of the current state say which lines continue it. A
*tentative* transition (a blank line inside a Python chained traceback or a Go goroutine dump)
continues the group only if a later line confirms it; otherwise the tentative lines are sent on
their own. Per batch, one search over the whole block (``"\\n".join`` of the texts) finds
batches in which no line can start or continue a group: their lines go through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from forwarder.config import Config, MultilineRule
from forwarder.records import ContainerInfo, LogLine, Position
from forwarder.selection import Predicate, compile_matcher

LABEL = "forwarder.multiline"
"""A container label naming a preset: that container's lines are joined with no config."""

Transition = tuple[re.Pattern[str], str, bool]  # pattern, next state, tentative


@dataclass(frozen=True)
class Grammar:
    start: re.Pattern[str] | None
    """A line that opens a group; None: any line (the group waits for what follows)."""
    states: dict[str, tuple[Transition, ...]]
    first: str = "g"
    block: re.Pattern[str] | None = None
    """Found nowhere in a batch (searched over the joined block, MULTILINE): no line of the
    batch can start or continue a group. A superset of the per-line patterns."""


def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


_JAVA_CONT = (
    r"^(?:\s+at\s|\s+\.\.\. \d+ (?:more|common frames omitted)|\s*Caused by: |\s*Suppressed: )"
)
_PY_TB = r"^Traceback \(most recent call last\):$"
_PY_CHAIN = (
    r"^(?:During handling of the above exception, another exception occurred:"
    r"|The above exception was the direct cause of the following exception:)$"
)
_GO_START = r"^(?:panic: |fatal error: |SIGQUIT: quit|goroutine \d+ \[)"
_GO_CONT = (
    r"^(?:\s|goroutine \d+ \[|\[signal |created by |panic: |PC=|exit status |"
    r"[\w.*/()\[\]{}-]+\(.*\)$|r[a-z0-9]{1,3}\s+0x[0-9a-f]+$)"
)
_RUBY_CONT = r"^(?:\s+from\s|\s+\S+:\d+:in\s|\s+\.\.\. \d+ levels\.\.\.)"

PRESETS: dict[str, Grammar] = {
    "java": Grammar(
        start=None,
        states={"g": ((_re(_JAVA_CONT), "g", False),)},
        block=re.compile(_JAVA_CONT, re.M),
    ),
    "ruby": Grammar(
        start=None,
        states={"g": ((_re(_RUBY_CONT), "g", False),)},
        block=re.compile(_RUBY_CONT, re.M),
    ),
    "python": Grammar(
        start=_re(_PY_TB),
        first="tb",
        states={
            "tb": ((_re(r"^\s"), "tb", False), (_re(r"^\S"), "exc", False)),
            "exc": ((_re(r"^$"), "gap", True),),
            "gap": ((_re(_PY_CHAIN), "chained", False),),
            "chained": ((_re(r"^$"), "gap2", False),),
            "gap2": ((_re(_PY_TB), "tb", False),),
        },
        block=re.compile(_PY_TB, re.M),
    ),
    "go": Grammar(
        start=_re(_GO_START),
        states={"g": ((_re(_GO_CONT), "g", False), (_re(r"^$"), "g", True))},
        block=re.compile(_GO_START, re.M),
    ),
}


def custom_grammar(start_pattern: str | None, continue_pattern: str | None) -> Grammar:
    """``start_pattern`` alone: a group runs until the next line matching it; with
    ``continue_pattern``: lines matching it continue the group (then a line matching neither is
    sent alone); ``continue_pattern`` alone: any line may open a group."""
    if continue_pattern is None:
        assert start_pattern is not None
        cont = re.compile(rf"^(?!.*?(?:{start_pattern}))", re.S)
        return Grammar(_re(start_pattern), {"g": ((cont, "g", False),)})
    start = _re(start_pattern) if start_pattern is not None else None
    block = re.compile(start_pattern, re.M) if start_pattern is not None else None
    if start is None:
        block = re.compile(continue_pattern, re.M)
    return Grammar(start, {"g": ((_re(continue_pattern), "g", False),)}, block=block)


@dataclass(frozen=True)
class Limits:
    max_lines: int = 500
    max_bytes: int = 1 << 20
    flush_timeout_s: float = 1.0


@dataclass
class _Group:
    lines: list[LogLine]
    state: str
    confirmed: int
    size: int
    before: Position | None
    """The position before the group's first line."""
    last_s: float


@dataclass
class Joiner:
    """One container's multiline state: feed it each batch with the position it reaches."""

    grammar: Grammar
    limits: Limits
    position: Position | None
    """How far the lines fed reach (the source's position)."""
    clock: Callable[[], float]
    groups: dict[str, _Group] = field(default_factory=dict)

    def safe_position(self) -> Position | None:
        """Where a restart resumes: before the first line of the earliest pending group."""
        if not self.groups:
            return self.position
        befores = [g.before for g in self.groups.values()]
        if any(b is None for b in befores):
            return None
        return min(b for b in befores if b is not None)

    def feed(
        self, lines: Sequence[LogLine], position: Position | None
    ) -> tuple[list[LogLine], Position | None]:
        """Records to send for a batch, and the position they make safe."""
        grammar = self.grammar
        block = grammar.block
        if block is not None and (grammar.start is None or not self.groups):
            found = block.search("\n".join([line.text for line in lines]))
            if found is None and grammar.start is not None:
                self.position = position
                return list(lines), position
            if found is None:
                return self._no_continuation(lines, position)
        out: list[LogLine] = []
        now = self.clock()
        before = self.position
        ts, count = (before.ts_ns, before.taken) if before is not None else (-1, 0)
        groups = self.groups
        start = grammar.start
        states = grammar.states
        limits = self.limits
        for line in lines:
            text = line.text
            group = groups.get(line.source)
            if group is not None:
                target = None
                for pattern, state, tentative in states[group.state]:
                    if pattern.search(text):
                        target = (state, tentative)
                        break
                size = len(text.encode()) + 1
                if (
                    target is not None
                    and len(group.lines) < limits.max_lines
                    and group.size + size <= limits.max_bytes
                ):
                    group.lines.append(line)
                    group.state = target[0]
                    if not target[1]:
                        group.confirmed = len(group.lines)
                    group.size += size
                    group.last_s = now
                    ts, count = _step(ts, count, line.ts_ns)
                    continue
                out += self._close(line.source)
            if start is None or start.search(text):
                groups[line.source] = _Group(
                    [line],
                    grammar.first,
                    1,
                    len(text.encode()),
                    Position(ts, count) if ts >= 0 else None,
                    now,
                )
            else:
                out.append(line)
            ts, count = _step(ts, count, line.ts_ns)
        self.position = position
        return out, self.safe_position()

    def _no_continuation(
        self, lines: Sequence[LogLine], position: Position | None
    ) -> tuple[list[LogLine], Position | None]:
        """No line of the batch continues a group (any line may start one): the pending
        groups end, and every line but each stream's last is sent alone."""
        out: list[LogLine] = []
        for source in list(self.groups):
            out += self._close(source)
        last: dict[str, int] = {}
        for index in range(len(lines) - 1, -1, -1):
            source = lines[index].source
            if source not in last:
                last[source] = index
                if len(last) == 2:
                    break
        keep = set(last.values())
        now = self.clock()
        for index, line in enumerate(lines):
            if index not in keep:
                out.append(line)
        for source, index in last.items():
            line = lines[index]
            before = _advance(self.position, lines[:index])
            self.groups[source] = _Group(
                [line], self.grammar.first, 1, len(line.text.encode()), before, now
            )
        self.position = position
        return out, self.safe_position()

    def _close(self, source: str) -> list[LogLine]:
        group = self.groups.pop(source)
        lines = group.lines
        keep = group.confirmed
        head = lines[:keep]
        joined = (
            head[0]
            if keep == 1
            else LogLine(head[0].source, head[0].ts_ns, "\n".join(line.text for line in head))
        )
        return [joined, *lines[keep:]]

    def deadline(self) -> float | None:
        """When the oldest-waiting pending group is due (the clock's time), or None."""
        if not self.groups:
            return None
        return min(g.last_s for g in self.groups.values()) + self.limits.flush_timeout_s

    def due(self) -> tuple[list[LogLine], Position | None]:
        """The groups that waited ``flush_timeout`` without a new line, sent as they are."""
        now = self.clock()
        out: list[LogLine] = []
        for source, group in list(self.groups.items()):
            if now - group.last_s >= self.limits.flush_timeout_s:
                out += self._close(source)
        return out, self.safe_position()

    def flush(self) -> tuple[list[LogLine], Position | None]:
        """Every pending group, sent as it is (the stream ended)."""
        out: list[LogLine] = []
        for source in list(self.groups):
            out += self._close(source)
        return out, self.position


def _step(ts: int, count: int, line_ts: int) -> tuple[int, int]:
    if line_ts > ts:
        return line_ts, 1
    if line_ts == ts:
        return ts, count + 1
    return ts, count


def _advance(position: Position | None, lines: Sequence[LogLine]) -> Position | None:
    ts, count = (position.ts_ns, position.taken) if position is not None else (-1, 0)
    for line in lines:
        ts, count = _step(ts, count, line.ts_ns)
    return Position(ts, count) if ts >= 0 else None


@dataclass(frozen=True)
class _Rule:
    match: Predicate | None
    grammar: Grammar
    limits: Limits


def _limits(rule: MultilineRule | None) -> Limits:
    if rule is None:
        return Limits()
    return Limits(rule.max_lines, rule.max_bytes, rule.flush_timeout.total_seconds())


def _grammar(rule: MultilineRule) -> Grammar:
    if rule.preset is not None:
        return PRESETS[rule.preset]
    return custom_grammar(rule.start_pattern, rule.continue_pattern)


@dataclass(frozen=True)
class MultilineRules:
    """``[[multiline]]`` rules and the ``forwarder.multiline`` label, compiled."""

    rules: tuple[_Rule, ...] = ()
    clock: Callable[[], float] = field(default=lambda: 0.0)

    @classmethod
    def from_config(cls, config: Config, clock: Callable[[], float]) -> MultilineRules:
        rules = tuple(
            _Rule(
                compile_matcher(rule.match) if rule.match is not None else None,
                _grammar(rule),
                _limits(rule),
            )
            for rule in config.multiline
        )
        return cls(rules, clock)

    def joiner(self, container: ContainerInfo, position: Position | None) -> Joiner | None:
        """A joiner for ``container``'s lines, or None when no rule nor label applies. The
        label (a preset's name) wins over the rules."""
        preset = container.labels.get(LABEL)
        if preset in PRESETS:
            return Joiner(PRESETS[preset], Limits(), position, self.clock)
        for rule in self.rules:
            if rule.match is None or rule.match(container):
                return Joiner(rule.grammar, rule.limits, position, self.clock)
        return None
