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
