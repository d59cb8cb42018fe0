"""Where sealed chunks go: the one :class:`Output` interface, and the stdout output.

``[output] mode`` picks one: ``"forward"``, the Forward protocol to Fluentd or Fluent Bit
(:class:`forwarder.forward.output.ForwardOutput`), or ``"stdout"``, each record printed as a
JSON line (:class:`StdoutOutput`). Either takes chunks from the buffer and hands each one it
sent to ``delivered``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Protocol, TextIO

from forwarder.buffer import ChunkBuffer
from forwarder.chunks import Chunk
from forwarder.forward.protocol import decode_entries


class Output(Protocol):
    """Takes chunks from the buffer until cancelled; each chunk it sent goes to its
    ``delivered`` callback, which moves positions and frees the chunk's place."""

    async def run(self) -> None: ...


class StdoutOutput:
    """Prints each record as a JSON line: for trying forwarder out and for debugging."""

    def __init__(
        self,
        buffer: ChunkBuffer,
        delivered: Callable[[Chunk], Awaitable[None]],
        stream: TextIO,
    ) -> None:
        self.buffer = buffer
        self.delivered = delivered
        self.stream = stream

    async def run(self) -> None:
        import msgpack

        while True:
            chunk = await self.buffer.get()
            tag, entries, options = msgpack.unpackb(chunk.payload, raw=False)
            if options.get("compressed") == "gzip":
                import gzip

                entries = gzip.decompress(entries)
            for time_, record in decode_entries(entries):
                line = {"tag": tag, "time": f"{time_.seconds}.{time_.nanoseconds:09d}"}
                line["record"] = record
                self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.stream.flush()
            await self.delivered(chunk)
