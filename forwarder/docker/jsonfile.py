"""Sans-I/O parsing of the engine's json-file log files, block by block.

What the engine writes, read in moby v20.10.24 (``daemon/logger/jsonfilelog/jsonfilelog.go``,
``jsonlog/jsonlogbytes.go``, ``jsonlog/time_marshalling.go``, ``loggerutils/logfile.go``) and
checked on this project's engine 20.10.24 (``tests/data/jsonfile/``):

- ``<data-root>/containers/<id>/<id>-json.log`` (inspect's ``LogPath``), one JSON object per
  line, written with one ``write()`` per message, ``\\n``-terminated:
  ``{"log":"...","stream":"stdout","attrs":{...},"time":"..."}`` in that key order.
  ``attrs`` is there only when the container has ``--log-opt labels/env/...`` (string values).
- ``log`` is the message plus ``\\n``, except for a partial message (``PLogMetaData`` not
  last): the copier cuts lines at 16 KiB, and those pieces, and an unterminated tail at exit,
  have no ``\\n``. Every piece carries its first piece's timestamp (see :mod:`.frames`), so
  :class:`~forwarder.docker.frames.PartialJoiner` joins them exactly as for the API source.
- Escaping (``ffjsonWriteJSONBytesAsString``): ``"``, ``\\``, ``\\n``, ``\\r`` as usual, other
  control bytes and ``<``, ``>``, ``&`` as ``\\u00XX``; **invalid UTF-8 bytes become
  ``\\ufffd``** (one per byte); U+2028/U+2029 escaped. So a file never holds invalid UTF-8
  nor lone surrogates; a line that does is not the engine's and is reported as garbled.
- ``time`` is Go's ``time.RFC3339Nano`` in UTC: **trailing zeros of the fraction are
  trimmed** (``.55676374Z``, 8 digits), and a whole second has no fraction at all
  (``...:23Z``). Only about 9 lines in 10 have the 30-byte form the API stream uses.
- Rotation (``max-size``/``max-file``, ``LogFile.checkCapacityAndRotate``): before a write,
  if the file already holds ``>= max-size`` bytes, the engine closes it, deletes
  ``.<max-file - 1>[.gz]``, renames ``.N[.gz]`` to ``.N+1[.gz]``, renames the file to ``.1``
  and creates a new ``<id>-json.log`` (new inode). A file can exceed ``max-size`` by one
  message. With ``compress=true`` a goroutine then gzips ``.1`` to ``.1.gz`` (new inode;
  header ``Extra`` = ``{"lastTime":"<RFC 3339>"}``, the last message's time) and deletes
  ``.1`` when done, so while ``.1`` exists ``.1.gz`` may be incomplete; the next rotation
  waits for the compression. Renamed files keep their inode. See :mod:`forwarder.tail`.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple

import msgspec

from forwarder.docker.frames import EngineStreamError
from forwarder.records import RawLine
from forwarder.timefmt import TimeFormatError, parse_time_ns

__all__ = ["MAX_ENTRY_BYTES", "Garbled", "JsonFileChunk", "JsonFileParser", "parse_json_time"]

MAX_ENTRY_BYTES: Final = 1 << 20
"""The longest line held while waiting for its ``\\n``. The engine's longest is a 16 KiB
piece escaped (at most 6 bytes per byte, ~96 KiB) plus ``attrs``; longer is not its output."""

_SHOW: Final = 60
_SCALE: Final = (0, *(10 ** (9 - k) for k in range(1, 10)))  # fraction digits -> ns factor
_new = tuple.__new__  # a NamedTuple without its Python-level __new__: the hot path


class _Entry(msgspec.Struct, gc=False):
    log: str
    stream: Literal["stdout", "stderr"]
    time: str
    attrs: dict[str, str] | None = None


_decoder: Final = msgspec.json.Decoder(_Entry)


class Garbled(NamedTuple):
    """A line that is not a json-file entry; skipped."""

    offset: int
    """Its byte offset in the file."""
    reason: str
    excerpt: bytes


class JsonFileChunk(NamedTuple):
    lines: list[RawLine]
    """The entries of the complete lines fed, in file order."""
    end_offset: int
    """The file offset just after the last complete line fed (where a reader resumes)."""
    garbled: list[Garbled]


def parse_json_time(value: str) -> int:
    """A json-file ``time`` (RFC 3339, 0 to 9 fraction digits, ``Z`` or an offset) -> ns;
    a bad one is an :class:`EngineStreamError`, which names the line."""
    try:
        return parse_time_ns(value)
    except TimeFormatError as exc:
        raise EngineStreamError(str(exc)) from None


class JsonFileParser:
    """A json-file log file's bytes -> :class:`RawLine` per entry, a block at a time.

    ``feed()`` takes any split of the file (from ``offset``, a line start) and returns the
    complete lines; an incomplete last line waits for the next block. The JSON of a whole
    block is decoded in one call; a block with a bad line is decoded again line by line,
    so a garbled line (not JSON, a key missing or mistyped, a bad time) costs only itself:
    it is returned in ``garbled`` with its offset. Empty lines are skipped.

    ``attrs`` is the ``attrs`` map of the last entry that had one (the engine writes the same
    map on every line of a container). With ``tty`` (the container has a TTY) the ``\\r`` of a
    line's ``\\r\\n`` is dropped too, as :class:`~forwarder.docker.frames.TtyReader` does.
    """

    __slots__ = ("_base", "_skipping", "_tail", "_time_cache", "_tty", "attrs")

    def __init__(self, offset: int = 0, *, tty: bool = False) -> None:
        self._tty = tty
        self._base = offset  # the file offset of self._tail[0]
        self._tail = b""
        self._skipping = False  # dropping an over-long line up to its "\n"
        self._time_cache: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM:SS." -> ns of that second
        self.attrs: dict[str, str] | None = None

    @property
    def offset(self) -> int:
        """The file offset after the last complete line fed."""
        return self._base

    @property
    def pending_bytes(self) -> int:
        return len(self._tail)

    def feed(self, data: bytes) -> JsonFileChunk:
        garbled: list[Garbled] = []
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                self._base += len(data)
                return JsonFileChunk([], self._base, garbled)
            self._skipping = False
            self._base += nl + 1
            data = data[nl + 1 :]
        buf = self._tail + data if self._tail else data
        cut = buf.rfind(b"\n") + 1
        start = self._base
        if cut == 0:
            self._tail = buf
            if len(buf) > MAX_ENTRY_BYTES:
                garbled.append(Garbled(start, "line too long", buf[:_SHOW]))
                self._base += len(buf)
                self._tail = b""
                self._skipping = True
            return JsonFileChunk([], self._base, garbled)
        self._tail = buf[cut:]
        if len(self._tail) > MAX_ENTRY_BYTES:
            garbled.append(Garbled(start + cut, "line too long", self._tail[:_SHOW]))
            self._tail = b""
            self._skipping = True
            self._base = start + len(buf)
        else:
            self._base = start + cut
        block = buf[:cut] if self._tail else buf
        try:
            entries = _decoder.decode_lines(block)
            return JsonFileChunk(self._convert(entries), self._base, garbled)
        except (msgspec.DecodeError, msgspec.ValidationError, EngineStreamError):
            return JsonFileChunk(self._line_by_line(block, start, garbled), self._base, garbled)

    def flush(self) -> JsonFileChunk:
        """At the end of a file that will not grow (rotated away): an unterminated last line
        is garbled (the engine writes whole lines); it is reported and skipped."""
        garbled: list[Garbled] = []
        if self._tail:
            garbled.append(Garbled(self._base, "unterminated last line", self._tail[:_SHOW]))
            self._base += len(self._tail)
            self._tail = b""
        self._skipping = False
        return JsonFileChunk([], self._base, garbled)

    def _convert(self, entries: list[_Entry]) -> list[RawLine]:
        """Entries -> lines; raises EngineStreamError on a bad time (the caller retries the
        block line by line, which names the line)."""
        out: list[RawLine] = []
        append = out.append
        cache = self._time_cache
        for e in entries:
            t = e.time
            base = cache.get(t[:20])
            if base is not None and len(t) <= 30 and t[-1] == "Z" and (frac := t[20:-1]).isdigit():
                ts_ns = base + int(frac) * _SCALE[len(frac)]
            else:
                ts_ns = self._slow_time(t)
            log = e.log
            if e.attrs is not None:
                self.attrs = e.attrs
            if log[-1:] == "\n":
                if self._tty and log[-2:] == "\r\n":
                    log = log[:-1]
                append(_new(RawLine, (e.stream, ts_ns, log[:-1].encode(), False)))
            else:
                append(_new(RawLine, (e.stream, ts_ns, log.encode(), True)))
        return out

    def _slow_time(self, t: str) -> int:
        ts_ns = parse_json_time(t)
        if len(t) >= 22 and t[19] == "." and t[-1] == "Z":  # the engine's form: cache its second
            if len(self._time_cache) >= 4096:
                self._time_cache.clear()
            frac = t[20:-1]
            self._time_cache[t[:20]] = ts_ns - int(frac) * _SCALE[len(frac)]
        return ts_ns

    def _line_by_line(self, block: bytes, start: int, garbled: list[Garbled]) -> list[RawLine]:
        out: list[RawLine] = []
        offset = start
        for raw in block.split(b"\n")[:-1]:  # the block ends with "\n"
            here = offset
            offset += len(raw) + 1
            if not raw.strip():
                continue
            try:
                out.extend(self._convert([_decoder.decode(raw)]))
            except (msgspec.DecodeError, msgspec.ValidationError, EngineStreamError) as exc:
                garbled.append(Garbled(here, str(exc), raw[:_SHOW]))
        return out
