"""Tuning constants: each named once, with its reason."""

from __future__ import annotations

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
