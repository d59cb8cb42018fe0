"""Sans-I/O parsing of the Docker Engine logs stream: frames, TTY messages, timestamps, and
the joining of long lines that the engine cut into pieces.

Input is the body of ``GET /containers/{id}/logs?follow=1&stdout=1&stderr=1&timestamps=1``.
What the engine does, as recorded from Engine 20.10 (``tests/data/engine/``) and read in
moby's ``daemon/logger/copier.go`` (the same since 18.03):

- Each message is ``<RFC3339Nano fixed, 30 bytes> <line>``; one message per frame without a
  TTY, messages back to back with one.
- The copier reads a stream into a 16384-byte buffer. A line that doesn't fit is logged in
  pieces of exactly 16384 bytes; the last piece carries the ``\\n``. At EOF (the process
  exits) an unterminated tail is logged as a shorter piece without ``\\n``. So only a piece
  of exactly 16384 bytes continues; a shorter one ends its line. (That also covers engines
  < 23.0 with the local driver, whose reader drops the ``\\n`` of a split line's last piece.)
- **Every piece of a line carries the timestamp of its first piece** (json-file, local; not
  journald, which stamps entries itself). A different timestamp starts a new line: that is
  how an exit's tail is told apart from the next run's first line after a restart.
- Pieces of a stdout line and stderr lines interleave in the engine's log, e.g. stdout piece 1
  (T1), stderr line (T2), stdout piece 2 (T1).
- ``since`` keeps the messages whose own timestamp is >= since, inclusive, so a replay from a
  position returns every piece of every line stamped at or after it, and none before.
- json-file has already replaced invalid UTF-8 by U+FFFD; local passes the bytes through.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Callable
from typing import Final

from forwarder.records import LogLine, RawLine
from forwarder.timefmt import TimeFormatError, parse_time_ns

__all__ = [
    "STDERR",
    "STDOUT",
    "Demuxer",
    "EngineStreamError",
    "LogLine",
    "PartialJoiner",
    "RawLine",
    "TtyReader",
    "split_timestamp",
]

STDOUT: Final = "stdout"
STDERR: Final = "stderr"

PIECE_BYTES: Final = 16384
"""The engine's copier buffer (``defaultBufSize``): long lines arrive in pieces this long."""

MAX_FRAME_BYTES: Final = 1 << 20
"""The largest frame payload accepted. The json-file and local drivers send at most
16384 + 32 bytes; loggers with their own buffer size (awslogs' dual-logging cache) up to
256 KiB. A longer length means the header is not a header: we lost sync with the stream."""

MAX_TTY_MESSAGE_BYTES: Final = 1 << 20
"""The longest TTY message held while looking for its end, for the same reason."""

_TS_LEN: Final = 30  # 2026-11-25T07:12:34.123456789Z
_OFFSET_TS_LEN: Final = 35  # 2026-11-25T08:12:34.123456789+01:00
_SHOW_BYTES: Final = 40
_ENGINE_ERROR_PREFIX: Final = b"Error grabbing logs: "

_header = struct.Struct(">LL")
_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__: the hot path
_STDOUT_WORD: Final = 0x01000000
_STDERR_WORD: Final = 0x02000000


class EngineStreamError(Exception):
    """The engine sent bytes we can't parse; the stream is unusable from here on.

    The message names the stream offset of the bad bytes. ``lines`` holds the messages that
    the same ``feed()`` completed before them: they are good, and must not be lost with the
    error (the caller takes them, then reads the stream again from there)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lines: list[RawLine] = []


def _show(data: bytes | bytearray | memoryview) -> str:
    """At most ``_SHOW_BYTES`` of ``data``, printable."""
    head = bytes(data[:_SHOW_BYTES])
    return repr(head) + ("..." if len(data) > _SHOW_BYTES else "")


# ---------------------------------------------------------------------------- timestamps

_TS_SHAPE_RE = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")


def split_timestamp(message: bytes) -> tuple[int, bytes]:
    """``b"<timestamp> <rest>"`` -> ``(ts_ns, rest)``."""
    ts_ns, start = _split_ts(message, 0, len(message))
    return ts_ns, message[start:]


def _split_ts(src: bytes, start: int, end: int) -> tuple[int, int]:
    """Parse the timestamp at ``src[start:end]``: ``(ts_ns, offset of the message text)``."""
    # The engine writes the 30-byte 'Z' form; the 35-byte offset form costs nothing here.
    if end - start > _TS_LEN and src[start + _TS_LEN] == 0x20:
        width = _TS_LEN
    elif end - start > _OFFSET_TS_LEN and src[start + _OFFSET_TS_LEN] == 0x20:
        width = _OFFSET_TS_LEN
    else:
        raise EngineStreamError(f"no timestamp and space: {_show(src[start:end])}")
    try:
        return parse_time_ns(src[start : start + width], fraction_digits=9), start + width + 1
    except TimeFormatError as exc:
        raise EngineStreamError(str(exc)) from exc


# ---------------------------------------------------------------------------- non-TTY


class Demuxer:
    """The multiplexed (non-TTY) logs stream -> :class:`RawLine` per frame.

    Any split of the input gives the same lines as feeding it whole. After an
    :class:`EngineStreamError` (whose ``lines`` are the good messages before the bad bytes)
    the stream is unusable and every later call raises again.

    A frame on stream 3 (systemerr) carries an error of the engine's own ("Error grabbing
    logs: ..."), after which the engine goes on; it goes to ``on_engine_error``, or, without
    one, raises :class:`EngineStreamError`.
    """

    __slots__ = ("_broken", "_buf", "_offset", "_on_engine_error", "_sec_ns", "_sec_prefix")

    def __init__(self, on_engine_error: Callable[[str], None] | None = None) -> None:
        self._buf = bytearray()  # an incomplete frame, never more
        self._offset = 0  # stream offset of the first byte not yet parsed
        self._on_engine_error = on_engine_error
        self._broken: str | None = None
        # The last timestamp's 'YYYY-MM-DDTHH:MM:SS.' and its value: a run of lines in the
        # same second costs a startswith() instead of date arithmetic.
        self._sec_prefix = b"\xff"
        self._sec_ns = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held back: the start of a frame whose end hasn't arrived."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[RawLine]:
        """Parse ``data``; returns the messages it completes."""
        if self._broken is not None:
            raise EngineStreamError(f"stream already broken: {self._broken}")
        out: list[RawLine] = []
        try:
            pos = 0
            buf = self._buf
            if buf:
                # Complete the frame left over from the last call, copying only that frame.
                if len(buf) < 8:
                    pos = 8 - len(buf)
                    buf += data[:pos]
                    if len(buf) < 8:
                        return out
                need = 8 + self._check_header(buf, 0, self._offset)
                take = need - len(buf)
                buf += data[pos : pos + take]
                pos += take
                if len(buf) < need:
                    return out
                frame = bytes(buf)
                buf.clear()
                self._parse(frame, 0, self._offset, out)
                self._offset += need
            end = len(data)
            if pos < end:
                parsed = self._parse(data, pos, self._offset - pos, out)
                self._offset += parsed - pos
                if parsed < end:
                    buf += memoryview(data)[parsed:]
        except EngineStreamError as exc:
            self._broken = str(exc)
            exc.lines = out
            raise
        return out

    def _check_header(self, src: bytes | bytearray, p: int, base: int) -> int:
        """Validate the frame header at ``p``; returns the payload length."""
        word, length = _header.unpack_from(src, p)
        if word not in (_STDOUT_WORD, _STDERR_WORD, 0, 0x03000000):
            shown = _show(src[p : p + _SHOW_BYTES + 1])
            raise EngineStreamError(f"bad frame header at stream offset {base + p}: {shown}")
        if length > MAX_FRAME_BYTES:
            raise EngineStreamError(
                f"oversized frame at stream offset {base + p}: {length} bytes, more than "
                f"{MAX_FRAME_BYTES}: {_show(src[p : p + _SHOW_BYTES + 1])}"
            )
        return int(length)

    # 8-byte header: [stream: u8][0][0][0][payload length: u32 big-endian], then the payload:
    # "<30-byte timestamp> <line>" with "\n" at the end unless it is a partial piece.
    # Stream 1 is stdout, 2 stderr, 3 an engine error (no timestamp); 0 (stdin) counts as
    # stdout, as stdcopy does.
    def _parse(self, src: bytes, p: int, base: int, out: list[RawLine]) -> int:
        """Parse whole frames from ``src[p:]``; returns where the first incomplete one starts.

        ``base`` is the stream offset of ``src[0]``, for error messages.
        """
        end = len(src)
        append = out.append
        unpack = _header.unpack_from
        new = _new
        raw_line = RawLine
        stdout = STDOUT
        stderr = STDERR
        sec_prefix = self._sec_prefix
        sec_ns = self._sec_ns
        try:
            while end - p >= 8:
                word, length = unpack(src, p)
                s = p + 8
                q = s + length
                if word == 0x01000000:
                    source = stdout
                elif word == 0x02000000:
                    source = stderr
                else:
                    self._check_header(src, p, base)
                    source = stdout
                if q > end:
                    if length > MAX_FRAME_BYTES:
                        self._check_header(src, p, base)
                    break
                if word == 0x03000000:
                    self._engine_error(src[s:q])
                    p = q
                    continue
                # Fast path: the same second as the previous line, in the engine's 'Z' form.
                if (
                    length > 30
                    and src[s + 30] == 0x20
                    and src[s + 29] == 0x5A
                    and src.startswith(sec_prefix, s)
                    and (fraction := src[s + 20 : s + 29]).isdigit()
                ):
                    ts_ns = sec_ns + int(fraction)
                    d = s + 31
                else:
                    ts_ns, d = self._slow_timestamp(src, s, q, base)
                    sec_prefix = self._sec_prefix
                    sec_ns = self._sec_ns
                if src[q - 1] == 0x0A:
                    append(new(raw_line, (source, ts_ns, src[d : q - 1], False)))
                else:
                    append(new(raw_line, (source, ts_ns, src[d:q], True)))
                p = q
        finally:
            self._sec_prefix = sec_prefix
            self._sec_ns = sec_ns
        return p

    def _slow_timestamp(self, src: bytes, s: int, q: int, base: int) -> tuple[int, int]:
        try:
            ts_ns, d = _split_ts(src, s, q)
        except EngineStreamError as exc:
            raise EngineStreamError(f"bad message at stream offset {base + s}: {exc}") from exc
        if d == s + _TS_LEN + 1:
            self._sec_prefix = bytes(src[s : s + 20])
            self._sec_ns = ts_ns - int(src[s + 20 : s + 29])
        return ts_ns, d

    def _engine_error(self, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace").rstrip("\n")
        if self._on_engine_error is None:
            raise EngineStreamError(f"the engine reported: {text}")
        self._on_engine_error(text)


# ---------------------------------------------------------------------------- TTY


class TtyReader:
    """The raw (TTY) logs stream -> :class:`RawLine` per message; all of it is stdout.

    The pty turns ``\\n`` into ``\\r\\n``; the ``\\r`` is stripped with the ``\\n``. Messages
    have no length prefix, so piece boundaries are found by their timestamps: a piece is
    followed by a timestamp equal to its own (the engine stamps every piece of a line with
    the first one's time) and, on json-file and local, is exactly ``piece_bytes`` long. An
    unterminated tail left at a container's exit is followed by a *later* timestamp, e.g.
    ``TS1 prompt> TS2 first line of the next run\\r\\n``; it comes out as a piece of its own.
    A timestamp earlier than the message's (a program printing its own clock) is text.
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_held",
        "_need",
        "_offset",
        "_on_engine_error",
        "_piece_bytes",
        "_sec_ns",
        "_sec_prefix",
    )

    def __init__(
        self,
        piece_bytes: int = PIECE_BYTES,
        on_engine_error: Callable[[str], None] | None = None,
    ) -> None:
        self._piece_bytes = piece_bytes
        self._on_engine_error = on_engine_error
        self._buf = bytearray()  # an incomplete message, from its timestamp on
        self._offset = 0
        self._broken: str | None = None
        self._sec_prefix = b"\xff"
        self._sec_ns = 0
        # A piece ending in "\r", held back until the next message says whether it was the
        # "\r" of a "\r\n" whose "\n" filled the next piece on its own.
        self._held: RawLine | None = None
        self._need = 0  # parsing again is pointless before the buffer holds this much

    @property
    def pending_bytes(self) -> int:
        """Bytes held back: a message whose end hasn't been seen yet."""
        return len(self._buf) + (len(self._held.data) if self._held is not None else 0)

    def feed(self, data: bytes) -> list[RawLine]:
        """Parse ``data``; returns the messages it completes."""
        return self._run(data, final=False)

    def flush(self) -> list[RawLine]:
        """At the end of the stream: the unterminated tail, if any, as a complete line.

        Only at a clean end: after a broken connection the tail may be cut short."""
        return self._run(b"", final=True)

    def _run(self, data: bytes, final: bool) -> list[RawLine]:
        if self._broken is not None:
            raise EngineStreamError(f"stream already broken: {self._broken}")
        buf = self._buf
        out: list[RawLine] = []
        if buf:
            if (
                not final
                and len(buf) + len(data) < self._need
                and b"\n" not in data
                and b"Z " not in data
                and not (data[:1] == b" " and buf[-1:] == b"Z")
            ):
                # Nothing in here can end the waiting message: don't parse it all again.
                buf += data
                return out
            buf += data
            src = bytes(buf)
            buf.clear()
        else:
            src = data
        try:
            parsed = self._parse(src, final, out)
        except EngineStreamError as exc:
            self._broken = str(exc)
            exc.lines = out
            raise
        self._offset += parsed
        if parsed < len(src):
            buf += memoryview(src)[parsed:]
        if final and self._held is not None:
            out.append(self._held._replace(data=self._held.data[:-1], partial=False))
            self._held = None
        return out

    # "<30-byte timestamp> <text>\r\n" back to back; a long line's pieces are
    # "<TS1> <16384 bytes><TS1> <rest>\r\n"; an exit's tail is "<TS1> <text><TS2> <next>...".
    # One loop with its locals hoisted, long on purpose: every TTY log byte passes here, and
    # bench/bench_frames.py (TtyReader.feed) measures what helper calls per line would cost.
    def _parse(self, src: bytes, final: bool, out: list[RawLine]) -> int:  # noqa: C901
        self._need = 0
        end = len(src)
        piece = self._piece_bytes
        append = out.append
        base = self._offset
        p = 0
        while p < end:
            # The timestamp, fast path as in Demuxer._parse.
            if (
                end - p > _TS_LEN
                and src[p + 30] == 0x20
                and src[p + 29] == 0x5A
                and src.startswith(self._sec_prefix, p)
                and (fraction := src[p + 20 : p + 29]).isdigit()
            ):
                ts_ns = self._sec_ns + int(fraction)
                d = p + 31
            else:
                got = self._slow_start(src, p, end, final, base)
                if got is None:
                    self._need = _TS_LEN + 1
                    break
                if got[0] < 0:  # an engine error line, consumed
                    p = got[1]
                    continue
                ts_ns, d = got
            # Where does this message end? complete: True a line, False a piece, None unknown.
            limit = d + piece
            complete: bool | None = True
            nl = src.find(b"\n", d, limit)
            glue = -1
            if nl >= 0:
                stop, nxt = nl, nl + 1
                glue = self._find_timestamp(src, d, stop, ts_ns)
            elif end >= limit + 31 and src[limit : limit + 31] == src[p : p + 31]:
                # A whole piece. (No tail can hide in it: the timestamp after a tail is the
                # next run's, and this one is the piece's own.)
                stop = nxt = limit
                complete = False
            else:
                # No newline within a piece, and no boundary where one belongs (yet): more
                # bytes to come, an exit's tail, or a logger with another piece size.
                nl = src.find(b"\n", limit, end) if end > limit else -1
                if nl >= 0:
                    stop, nxt = nl, nl + 1
                else:
                    stop = nxt = end
                    complete = True if final else None
                glue = self._find_timestamp(src, d, stop, ts_ns)
            if glue >= 0:
                stop = nxt = glue
                complete = False
            elif complete is None:
                if end - p > MAX_TTY_MESSAGE_BYTES:
                    raise EngineStreamError(
                        f"TTY message at stream offset {base + p} runs past "
                        f"{MAX_TTY_MESSAGE_BYTES} bytes without a newline or a piece "
                        f"boundary: {_show(src[p:])}"
                    )
                # Wait for the rest: a newline, a timestamp, or enough for a whole piece.
                self._need = MAX_TTY_MESSAGE_BYTES + 1
                if end < limit + 31:
                    self._need = min(self._need, limit + 31 - p)
                break
            if complete and stop > d and src[stop - 1] == 0x0D:
                stop -= 1  # the "\r" of "\r\n"
            data = src[d:stop]
            held = self._held
            if held is not None:
                self._held = None
                if held.ts_ns == ts_ns and complete and not data:
                    # The held piece's "\r" and this empty piece's "\n" end the line.
                    append(_new(RawLine, (STDOUT, ts_ns, held.data[:-1], False)))
                    p = nxt
                    continue
                if held.ts_ns != ts_ns:  # nothing continues it: the "\r" ended it
                    held = _new(RawLine, (STDOUT, held.ts_ns, held.data[:-1], True))
                append(held)
            if not complete and data[-1:] == b"\r":
                self._held = _new(RawLine, (STDOUT, ts_ns, data, True))
            else:
                append(_new(RawLine, (STDOUT, ts_ns, data, not complete)))
            p = nxt
        return p

    def _slow_start(
        self, src: bytes, p: int, end: int, final: bool, base: int
    ) -> tuple[int, int] | None:
        """The timestamp at ``p`` the slow way: ``(ts_ns, text offset)``, ``None`` when more
        bytes are needed, or ``(-1, next offset)`` after an engine error line."""
        prefix = _ENGINE_ERROR_PREFIX
        if src.startswith(prefix, p) or (end - p < len(prefix) and prefix.startswith(src[p:end])):
            # The engine writes its own errors raw into a TTY stream: no timestamp.
            nl = src.find(b"\n", p)
            if nl < 0:
                if final:
                    nl = end
                else:
                    return None
            text = src[p:nl].decode("utf-8", "replace")
            if self._on_engine_error is None:
                raise EngineStreamError(f"the engine reported: {text}")
            self._on_engine_error(text)
            return -1, min(nl + 1, end)
        whole_z = end - p > _TS_LEN and src[p + _TS_LEN] == 0x20
        if (
            not final
            and not whole_z
            and end - p <= _OFFSET_TS_LEN
            and _could_start_timestamp(src[p:end])
        ):
            return None
        try:
            ts_ns, d = _split_ts(src, p, end)
        except EngineStreamError as exc:
            raise EngineStreamError(f"bad message at stream offset {base + p}: {exc}") from exc
        if d == p + _TS_LEN + 1:
            self._sec_prefix = bytes(src[p : p + 20])
            self._sec_ns = ts_ns - int(src[p + 20 : p + 29])
        return ts_ns, d

    def _find_timestamp(self, src: bytes, d: int, stop: int, ts_ns: int) -> int:
        """The offset of an engine timestamp (``>= ts_ns``) inside ``src[d+1:stop]``, or -1."""
        # An embedded timestamp starts at least one byte into the text (the engine never
        # logs an empty piece), so its "Z " is at d + 30 or later.
        k = src.find(b"Z ", d + 30, stop)
        while k >= 0:
            c = k - 29
            if _TS_SHAPE_RE.fullmatch(src, c, k + 1):
                try:
                    if parse_time_ns(src[c : k + 1], fraction_digits=9) >= ts_ns:
                        return c
                except TimeFormatError:
                    pass  # shaped like one but not a date: text
            k = src.find(b"Z ", k + 1, stop)
        return -1


_TS_TEMPLATES: Final = (
    b"0000-00-00T00:00:00.000000000Z ",
    b"0000-00-00T00:00:00.000000000+00:00 ",
    b"0000-00-00T00:00:00.000000000-00:00 ",
)


def _could_start_timestamp(head: bytes) -> bool:
    """Whether ``head`` (shorter than a timestamp) may be the start of one."""
    return any(
        all(
            (0x30 <= got <= 0x39) if want == 0x30 else got == want
            for got, want in zip(head, template, strict=False)
        )
        for template in _TS_TEMPLATES
    )


# ---------------------------------------------------------------------------- joining


class _Slot:
    """A place in the output: a line still being joined, and/or lines ready to go out."""

    __slots__ = ("closed", "done", "done_bytes", "full", "pieces", "size", "source", "ts_ns")

    def __init__(self, source: str, ts_ns: int, closed: bool = False) -> None:
        self.source = source
        self.ts_ns = ts_ns
        self.pieces: list[bytes] = []
        self.size = 0
        self.done: list[LogLine] = []
        self.done_bytes = 0
        self.closed = closed
        self.full = False  # the last piece filled the engine's buffer


def _cut_point(data: bytes, limit: int) -> int:
    """The largest cut <= ``limit`` that doesn't split a UTF-8 sequence (if any is valid)."""
    cut = limit
    while cut > 0 and limit - cut < 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 and (data[cut] & 0xC0) != 0x80 else limit


class PartialJoiner:
    """Joins the pieces of long lines, per source, into :class:`LogLine`.

    A partial piece continues in the next message of its source only if it filled the
    engine's buffer (``piece_bytes``) and, unless exactly that long, the next message has the
    same timestamp; otherwise it ends its line (an exit's tail, see the module docstring).

    Resume positions: a joined line carries the timestamp of its first piece (the engine
    gives all its pieces that same timestamp) and comes out **at the place of its first
    piece**: lines of the other source that complete meanwhile are held back until it is
    whole. So the output is in the order of the engine's messages, and a position
    ``(ts_ns, count)`` taken from it is exact: replaying with ``since=ts_ns`` yields every
    piece of every line from there on, in the same order, and skipping the ``count`` lines
    stamped ``ts_ns`` lands just after the last line taken. (Had stderr's line gone out
    first, a position at its timestamp would lose the rest of the stdout line on replay.)

    Limits: a line longer than ``max_line_bytes`` is split there (at a UTF-8 boundary), and
    again every ``max_line_bytes``. ``on_split(source, bytes_emitted)`` is called once per
    line, at its first cut: a line that never ends must not report a cut per MiB forever.
    Held-back lines are capped at ``max_held_bytes`` (default ``max_line_bytes``); past it,
    the unfinished line that holds them is emitted as it is (a split, reported the same way)
    and its rest becomes a line of its own. Only then can a replay from a position see
    different lines.
    """

    __slots__ = (
        "_cut_line",
        "_held_bytes",
        "_max",
        "_max_held",
        "_on_split",
        "_open",
        "_piece",
        "_slots",
    )

    def __init__(
        self,
        max_line_bytes: int,
        on_split: Callable[[str, int], None] | None = None,
        *,
        max_held_bytes: int | None = None,
        piece_bytes: int = PIECE_BYTES,
    ) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1, not {max_line_bytes}")
        self._max = max_line_bytes
        self._max_held = max_line_bytes if max_held_bytes is None else max_held_bytes
        self._on_split = on_split
        self._piece = piece_bytes
        self._open: dict[str, _Slot] = {}  # the unfinished line of each source
        self._slots: deque[_Slot] = deque()  # output order; empty in the common case
        self._held_bytes = 0  # finished lines waiting behind an unfinished one
        # Per source, the timestamp of the line whose cut was reported last: every piece of a
        # line carries its first piece's timestamp, so this says "already reported".
        self._cut_line: dict[str, int] = {}

    @property
    def pending_bytes(self) -> int:
        """Bytes of unfinished lines plus finished lines held back behind them."""
        return sum(slot.size for slot in self._open.values()) + self._held_bytes

    def feed(self, lines: list[RawLine]) -> list[LogLine]:
        """Join ``lines``; returns the lines now complete, in the engine's order."""
        if self._slots:
            return self._feed_slow(lines, 0, [])
        out: list[LogLine] = []
        append = out.append
        limit = self._max
        for i, (source, ts_ns, data, partial) in enumerate(lines):
            if partial or len(data) > limit:
                return self._feed_slow(lines, i, out)
            append(_new(LogLine, (source, ts_ns, data.decode("utf-8", "replace"))))
        return out

    def flush(self) -> list[LogLine]:
        """At the end of the stream: every held piece and line, in order."""
        out: list[LogLine] = []
        for slot in self._slots:
            if not slot.closed:
                self._close(slot)
        self._drain(out)
        return out

    def _feed_slow(self, lines: list[RawLine], start: int, out: list[LogLine]) -> list[LogLine]:
        slots = self._slots
        opened = self._open
        for k in range(start, len(lines)):
            source, ts_ns, data, partial = lines[k]
            if partial and len(data) < self._piece:
                # Only a full buffer continues: a shorter piece is a tail left at exit, or
                # the last piece of a line on engines < 23.0 with the local driver (whose
                # reader forgot its "\n"). Either way the line ends here.
                partial = False
            slot = opened.get(source)
            if slot is not None and slot.ts_ns != ts_ns and not slot.full:
                # Pieces of one line share a timestamp, so the held ones were a tail left
                # unterminated at exit, and this message starts something new. (journald
                # stamps entries itself, but its pieces are whole buffers.)
                self._close(slot)
                slot = None
            if slot is not None:
                self._add(slot, data)
                if not partial:
                    self._close(slot)
                    self._cut_line.pop(source, None)
            elif partial:
                slot = _Slot(source, ts_ns)
                slots.append(slot)
                opened[source] = slot
                self._add(slot, data)
            elif slots:
                # Whole, but an earlier line is unfinished: wait behind it.
                last = slots[-1]
                if not last.closed:
                    last = _Slot(source, ts_ns, closed=True)
                    slots.append(last)
                self._emit(source, ts_ns, data, last.done)
                last.done_bytes += len(data)
                self._held_bytes += len(data)
            else:
                self._emit(source, ts_ns, data, out)
                continue
            if slots[0].done or slots[0].closed:
                self._drain(out)
            while self._held_bytes > self._max_held and slots:
                # Too much waits behind an unfinished line: let it go as it is.
                head = slots[0]
                if head.pieces:
                    self._report_cut(head.source, head.ts_ns, head.size)
                self._close(head)
                self._drain(out)
        return out

    def _emit(self, source: str, ts_ns: int, data: bytes, into: list[LogLine]) -> None:
        """One finished line (split if too long) into ``into``."""
        if len(data) > self._max:
            self._report_cut(source, ts_ns, _cut_point(data, self._max))
            while len(data) > self._max:
                cut = _cut_point(data, self._max)
                into.append(LogLine(source, ts_ns, data[:cut].decode("utf-8", "replace")))
                data = data[cut:]
        into.append(LogLine(source, ts_ns, data.decode("utf-8", "replace")))
        self._cut_line.pop(source, None)  # the line has ended

    def _report_cut(self, source: str, ts_ns: int, size: int) -> None:
        """Tell ``on_split`` of a cut, unless this line's first cut was told already."""
        if self._cut_line.get(source) == ts_ns:
            return
        self._cut_line[source] = ts_ns
        if self._on_split is not None:
            self._on_split(source, size)

    def _add(self, slot: _Slot, data: bytes) -> None:
        slot.full = len(data) == self._piece
        slot.pieces.append(data)
        slot.size += len(data)
        if slot.size <= self._max:
            return
        # Past the cap: cut off what fits, keep the rest pending (it may still grow).
        joined = b"".join(slot.pieces)
        while len(joined) > self._max:
            cut = _cut_point(joined, self._max)
            slot.done.append(
                LogLine(slot.source, slot.ts_ns, joined[:cut].decode("utf-8", "replace"))
            )
            slot.done_bytes += cut
            self._held_bytes += cut
            self._report_cut(slot.source, slot.ts_ns, cut)
            joined = joined[cut:]
        slot.pieces = [joined]
        slot.size = len(joined)

    def _close(self, slot: _Slot) -> None:
        """The line is whole (or let go): its pieces become one line."""
        data = b"".join(slot.pieces)
        slot.done.append(LogLine(slot.source, slot.ts_ns, data.decode("utf-8", "replace")))
        slot.done_bytes += len(data)
        self._held_bytes += len(data)
        slot.pieces = []
        slot.size = 0
        slot.closed = True
        if self._open.get(slot.source) is slot:
            del self._open[slot.source]

    def _drain(self, out: list[LogLine]) -> None:
        """Emit from the front of the output order up to the first unfinished line."""
        slots = self._slots
        while slots:
            head = slots[0]
            if head.done:
                out.extend(head.done)
                self._held_bytes -= head.done_bytes
                head.done = []
                head.done_bytes = 0
            if not head.closed:
                return
            slots.popleft()
