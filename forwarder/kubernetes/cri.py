"""The CRI log format, parsed per block (sans-I/O).

The kubelet's runtime (containerd, CRI-O's conmon) writes each container's output as::

    <RFC 3339 time with ns> <stdout|stderr> <tag> <text>\\n

``tag`` is ``F`` for a whole line (or the last piece of one) and ``P`` for a piece continued
by the next entry **of the same stream** (the CRI spec allows more tags after a ``:``; only
the first counts). conmon writes the time with a ``+00:00`` offset, splits long lines into
8,192-byte ``P`` pieces, lets the other stream's entries land between them, and leaves a
final unterminated write as a ``P`` with no ``F`` after it.

:class:`CriParser` turns blocks of a file into :class:`~forwarder.records.RawLine` s
(``partial`` for ``P``) that :class:`~forwarder.docker.frames.PartialJoiner` joins per
stream. Each piece of a line is given the time of the line's first piece (the joiner's rule,
and the time a joined line carries), so a line's pieces are never taken apart by time. The
offset after the last complete entry is returned with each block, and a line that is not in
the format is reported with its offset and skipped.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from forwarder.docker.jsonfile import Garbled
from forwarder.records import RawLine
from forwarder.timefmt import TimeFormatError, parse_time_ns

MAX_ENTRY_BYTES: Final = 1 << 20
"""An entry longer than this without a newline is not the CRI format (runtimes write pieces
of 8 KiB or 16 KiB): it is reported and skipped rather than held."""

_new = tuple.__new__


class CriChunk(NamedTuple):
    lines: list[RawLine]
    """The complete entries fed, in file order (``P`` pieces with ``partial`` set)."""
    end_offset: int
    """The byte offset after the last complete entry (a partial entry stays unread)."""
    garbled: list[Garbled]


class CriParser:
    """Feed a file's bytes from ``offset`` on, block by block (see the module docstring)."""

    __slots__ = ("_open", "_rest", "offset")

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        """The file offset of the first byte not yet parsed into an entry."""
        self._rest = b""
        self._open: dict[str, int] = {}  # per stream: the first piece's time of an open line

    def feed(self, data: bytes) -> CriChunk:
        buf = self._rest + data if self._rest else data
        lines: list[RawLine] = []
        garbled: list[Garbled] = []
        start = 0
        opened = self._open
        base = self.offset
        find = buf.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            entry = _parse(buf, start, nl)
            if isinstance(entry, str):
                garbled.append(Garbled(base + start, entry, buf[start : min(nl, start + 80)]))
            else:
                stream, ts_ns, text, partial = entry
                first = opened.get(stream)
                if first is not None:
                    ts_ns = first
                    if not partial:
                        del opened[stream]
                elif partial:
                    opened[stream] = ts_ns
                lines.append(_new(RawLine, (stream, ts_ns, text, partial)))
            start = nl + 1
        rest = buf[start:]
        if len(rest) > MAX_ENTRY_BYTES:
            garbled.append(Garbled(base + start, "no newline", rest[:80]))
            start = len(buf)
            rest = b""
        self._rest = rest
        self.offset = base + start
        return CriChunk(lines, self.offset, garbled)

    def flush(self) -> CriChunk:
        """At the end of a file: an unterminated last entry is reported, not taken."""
        garbled = []
        if self._rest:
            garbled.append(Garbled(self.offset, "unterminated last entry", self._rest[:80]))
            self.offset += len(self._rest)
            self._rest = b""
        return CriChunk([], self.offset, garbled)


def _parse(buf: bytes, start: int, end: int) -> tuple[str, int, bytes, bool] | str:
    """One entry ``buf[start:end]`` (without its newline), or why it is not one."""
    sp1 = buf.find(b" ", start, end)
    if sp1 < 0:
        return "no stream"
    sp2 = buf.find(b" ", sp1 + 1, end)
    if sp2 < 0:
        return "no tag"
    stream_b = buf[sp1 + 1 : sp2]
    if stream_b == b"stdout":
        stream = "stdout"
    elif stream_b == b"stderr":
        stream = "stderr"
    else:
        return "stream is not stdout or stderr"
    sp3 = buf.find(b" ", sp2 + 1, end)
    tag_end = end if sp3 < 0 else sp3
    first = buf[sp2 + 1 : sp2 + 2]
    if first == b"F":
        partial = False
    elif first == b"P":
        partial = True
    else:
        return "tag is not P or F"
    if tag_end != sp2 + 2 and buf[sp2 + 2 : sp2 + 3] != b":":
        return "tag is not P or F"
    try:
        ts_ns = parse_time_ns(buf[start:sp1])
    except TimeFormatError:
        return "bad time"
    text = buf[sp3 + 1 : end] if sp3 >= 0 else b""
    return stream, ts_ns, text, partial
