"""Tuning constants: each named once, with its reason."""

from __future__ import annotations

from collections.abc import Iterator

from forwarder.backoff import backoff_delays

# --- docker source ------------------------------------------------------------------------

SOURCE_RETRY_FIRST_S = 0.5
"""The first wait before a source's work is retried (the events stream, a follower, a stats
task); each wait doubles from here, with jitter (:func:`forwarder.backoff.backoff_delays`)."""
SOURCE_RETRY_MAX_S = 10.0
"""The longest wait between retries: an engine that comes back is found within this."""

EVENTS_REPLAY_NS = 1_000_000_000
"""How far back a reconnect asks ``/events`` again; the replayed events already seen are
dropped. The engine stamps an event before it queues it, so one stamped just before the
newest seen may not have been sent when the stream broke (out of order by tens of ms under
load, seen on Engine 20.10): a second covers that with room to spare."""

ENGINE_CONNECT_TIMEOUT_S = 10
"""Connecting to the engine: it is local or near, so 10 s means it is not there."""
ENGINE_REQUEST_TIMEOUT_S = 30
"""A plain request (list, inspect, one stats sample); streams set no total timeout."""


def source_retry_delays() -> Iterator[float]:
    """The waits before each retry of one piece of a source's work that keeps failing."""
    return backoff_delays(SOURCE_RETRY_FIRST_S, SOURCE_RETRY_MAX_S)


# --- pipeline and output --------------------------------------------------------------------

QUIET_S = 0.02
"""When no entry arrived for this long, the input has gone quiet: the chunk assembler seals
at once rather than let the last lines of a burst sit out a whole ``flush_interval``. While
the engine streams a burst, reads follow each other far faster than this."""

POSITIONS_SAVE_INTERVAL_S = 0.1
"""Positions are saved at most this often (each save is two fsyncs); what was delivered
since the last save is what a crash sends again, on top of the chunks in flight."""
POSITIONS_SAVE_RETRY_S = 1.0
"""The wait before saving positions again after a save failed (a full or read-only disk)."""

UNRECORDED_RELEASES = 2
"""Delivered disk chunks whose release may not be on disk yet (a crash sends them again): at
most this many, plus the chunks in flight. While the disk keeps up, a release record is
written as soon as its ack comes, with whatever else came during the last write."""

SEGMENT_MAX_BYTES = 8 << 20
"""The largest disk buffer segment file. A segment is deleted once everything in it is
delivered, so segments far smaller than ``[buffer] max_bytes`` free room well before the
cap; a chunk larger than a segment gets one of its own."""
SEGMENT_MIN_BYTES = 64 * 1024
"""The smallest segment, however small ``max_bytes``: fewer files, fewer directory fsyncs."""
SEGMENTS_PER_BUFFER = 8
"""A segment is at most ``max_bytes`` over this (within the bounds above), so that deleting
delivered ones frees room well before the cap."""

CHUNKS_IN_FLIGHT = 4
"""Chunks that may await their acks at once on one connection (pipelined, in order). With
one chunk in flight, a link's round trip caps the output at chunk_limit per RTT; with 4, the
next chunks travel while the server works. bench/bench_output.py, 1 MiB chunks, MB/s for
1 / 4 in flight: RTT 2 ms 199 / 621, 10 ms 69 / 243, 50 ms 18 / 67 (74k / 284k lines/s).
On loopback (bench/bench_pipeline.py) both are ~120k lines/s: reading is the limit there."""
CONNECTION_CLOSE_TIMEOUT_S = 1.0
"""How long closing a connection may wait for the transport to finish before aborting it."""
