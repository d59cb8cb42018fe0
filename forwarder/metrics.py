"""Prometheus metrics, read from the pipeline's own counters when scraped.

Nothing here runs on the hot path: the pipeline already counts what it reads, buffers and
delivers (the SIGUSR1 status line shows the same counts), and :class:`PipelineMetrics`, a
custom ``prometheus_client`` collector, turns them into metric families at scrape time.
:data:`METRICS` declares each metric once: its name, type, labels and meaning; the README's
table is generated from it (``python -m forwarder.schema``).

Labels are bounded: ``kind`` (3 values), ``tier`` (2), ``server`` (the configured servers).
No metric has a per-container label: with 500 containers that come and go, every one would
leave a series behind in Prometheus for its retention time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from forwarder.forward.balance import ServerState
from forwarder.forward.output import ACK_RTT_BUCKETS_S
from forwarder.records import RecordKind

if TYPE_CHECKING:
    from forwarder.pipeline import Pipeline

KINDS: tuple[RecordKind, ...] = ("log", "stats", "lifecycle")


@dataclass(frozen=True)
class MetricDef:
    name: str
    type: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricDef, ...] = (
    MetricDef(
        "forwarder_records_read_total",
        "counter",
        ("kind",),
        "Records read, by kind (log, stats, lifecycle); a log record is one line.",
    ),
    MetricDef(
        "forwarder_records_delivered_total",
        "counter",
        ("kind",),
        "Records delivered (acked by a server, or printed in stdout mode), by kind.",
    ),
    MetricDef(
        "forwarder_record_bytes_total",
        "counter",
        ("kind",),
        "Bytes of the records read, by kind, as encoded for the wire (MessagePack entries, "
        "before compression).",
    ),
    MetricDef(
        "forwarder_delivered_bytes_total",
        "counter",
        ("kind",),
        "Bytes of the chunks delivered, by kind: their PackedForward messages as sent (the "
        'entries, gzip-compressed with [output] compress = "gzip", with the tag and options).',
    ),
    MetricDef(
        "forwarder_chunks_sent_total",
        "counter",
        (),
        "Chunk sends; a chunk sent again counts again.",
    ),
    MetricDef(
        "forwarder_chunks_delivered_total",
        "counter",
        (),
        "Chunks delivered (acked by a server, or printed in stdout mode).",
    ),
    MetricDef(
        "forwarder_chunks_retried_total",
        "counter",
        (),
        "Chunks set to go again (to the same or the next server) after a failed send or a "
        "lost ack.",
    ),
    MetricDef(
        "forwarder_chunks_dropped_total",
        "counter",
        (),
        'Chunks dropped by [buffer] overflow = "drop_oldest".',
    ),
    MetricDef(
        "forwarder_records_dropped_total",
        "counter",
        (),
        'Records in the chunks dropped by [buffer] overflow = "drop_oldest".',
    ),
    MetricDef(
        "forwarder_records_lost_corrupt_total",
        "counter",
        (),
        "Records of disk-buffer chunks that failed their CRC when read back.",
    ),
    MetricDef(
        "forwarder_buffer_bytes",
        "gauge",
        ("tier",),
        "memory: bytes of chunks held in memory (queued, cached, in flight); disk: the size "
        "of the disk buffer's segment files.",
    ),
    MetricDef(
        "forwarder_buffer_chunks",
        "gauge",
        ("tier",),
        "Chunks waiting to be delivered: in memory, and in the disk buffer.",
    ),
    MetricDef(
        "forwarder_buffer_waiting_puts",
        "gauge",
        (),
        "Chunks waiting for room in a full buffer: the sources that made them are paused "
        "(backpressure).",
    ),
    MetricDef(
        "forwarder_server_up",
        "gauge",
        ("server",),
        "1 while the server takes chunks, 0 while it is marked down after a failure.",
    ),
    MetricDef(
        "forwarder_server_chunks_delivered_total",
        "counter",
        ("server",),
        "Chunks acked by each server.",
    ),
    MetricDef(
        "forwarder_server_failures_total",
        "counter",
        ("server", "reason"),
        "Failures of each server, one per connection however many chunks were in flight, by "
        "reason: connect, tls_handshake, handshake (the Forward handshake: shared key, user), "
        "connection_lost, ack_timeout, protocol.",
    ),
    MetricDef(
        "forwarder_server_connections_total",
        "counter",
        ("server",),
        "Connections to each server that completed TCP, TLS and the handshake.",
    ),
    MetricDef(
        "forwarder_server_connected",
        "gauge",
        ("server",),
        "1 while a connection to the server is open.",
    ),
    MetricDef(
        "forwarder_server_ack_rtt_seconds",
        "histogram",
        ("server",),
        "Time from sending a chunk to its ack, per chunk acked.",
    ),
    MetricDef(
        "forwarder_delivery_lag_seconds",
        "gauge",
        (),
        "At the last delivery of log lines: the delivery's time minus the newest delivered "
        "line's engine time. It does not grow while the containers are quiet; for the time "
        "since the newest delivered line use time() - "
        "forwarder_last_delivered_record_timestamp_seconds.",
    ),
    MetricDef(
        "forwarder_last_delivered_record_timestamp_seconds",
        "gauge",
        (),
        "The engine time of the newest log line delivered, in seconds since the epoch "
        "(0 before the first).",
    ),
    MetricDef(
        "forwarder_followers",
        "gauge",
        ("source",),
        "Containers whose log is followed, by source (api: the Engine API logs stream).",
    ),
    MetricDef("forwarder_stats_pollers", "gauge", (), "Containers sampled for stats."),
    MetricDef(
        "forwarder_engine_connections",
        "gauge",
        (),
        "Open connections to the engine (absent when aiohttp does not show them).",
    ),
    MetricDef(
        "forwarder_engine_up",
        "gauge",
        (),
        "1 while the containers are listed and the engine's events stream is read.",
    ),
    MetricDef(
        "forwarder_engine_reconnects_total",
        "counter",
        (),
        "Times the listing and events stream started again after a failure.",
    ),
    MetricDef("forwarder_positions_saves_total", "counter", (), "Saves of the positions file."),
    MetricDef("forwarder_tasks", "gauge", (), "asyncio tasks of the process."),
)

_BY_NAME = {m.name: m for m in METRICS}


_Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
_Histogram = tuple[list[int], float]
"""Counts per bucket of ACK_RTT_BUCKETS_S then +Inf (not cumulative), and the sum."""


def _family(name: str) -> _Family:
    definition = _BY_NAME[name]
    labels = list(definition.labels)
    if definition.type == "counter":
        return CounterMetricFamily(name, definition.help, labels=labels)
    if definition.type == "histogram":
        return HistogramMetricFamily(name, definition.help, labels=labels)
    return GaugeMetricFamily(name, definition.help, labels=labels)


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, count in zip([*map(str, ACK_RTT_BUCKETS_S), "+Inf"], counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


class PipelineMetrics(Collector):
    """Reads the pipeline's counters at scrape time; must run on the event loop's thread."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def describe(self) -> list[Metric]:
        return []  # not checked against: collect() is only called at scrape time

    def collect(self) -> Iterator[Metric]:
        values = self._values()
        histograms = self._histograms()
        for definition in METRICS:
            family = _family(definition.name)
            if isinstance(family, HistogramMetricFamily):
                for labels, (counts, sum_s) in histograms.get(definition.name, []):
                    family.add_metric(list(labels), _buckets(counts), sum_s)
            else:
                for labels, value in values.get(definition.name, []):
                    family.add_metric(list(labels), value)
            yield family

    def _histograms(self) -> dict[str, list[tuple[tuple[str, ...], _Histogram]]]:
        servers = getattr(self.pipeline.output, "servers", None)
        if servers is None:
            return {}
        return {
            "forwarder_server_ack_rtt_seconds": [
                ((s.name,), (s.ack_rtt_counts, s.ack_rtt_sum_s)) for s in servers
            ]
        }

    def _values(self) -> dict[str, list[tuple[tuple[str, ...], float]]]:
        p = self.pipeline
        buffer = p.buffer
        read, delivered = p.assembler.records_in, p.delivered
        out: dict[str, list[tuple[tuple[str, ...], float]]] = {
            "forwarder_records_read_total": [((k,), read[k]) for k in KINDS],
            "forwarder_records_delivered_total": [((k,), delivered[k]) for k in KINDS],
            "forwarder_record_bytes_total": [((k,), p.assembler.bytes_in[k]) for k in KINDS],
            "forwarder_delivered_bytes_total": [((k,), p.delivered_bytes[k]) for k in KINDS],
            "forwarder_chunks_delivered_total": [((), p.chunks_delivered)],
            "forwarder_chunks_dropped_total": [((), buffer.dropped_chunks)],
            "forwarder_records_dropped_total": [((), buffer.dropped_records)],
            "forwarder_records_lost_corrupt_total": [((), buffer.lost_corrupt)],
            "forwarder_buffer_bytes": [
                (("memory",), buffer.bytes_held),
                (("disk",), buffer.disk_bytes),
            ],
            "forwarder_buffer_chunks": [
                (("memory",), buffer.queued - buffer.disk_chunks),
                (("disk",), buffer.disk_chunks),
            ],
            "forwarder_buffer_waiting_puts": [((), buffer.waiting_puts)],
            "forwarder_last_delivered_record_timestamp_seconds": [
                ((), p.newest_delivered_ns / 1e9)
            ],
            "forwarder_followers": [(("api",), len(p.discovery.followers))],
            "forwarder_stats_pollers": [((), len(p.stats) if p.stats is not None else 0)],
            "forwarder_engine_up": [((), float(p.discovery.events_up))],
            "forwarder_engine_reconnects_total": [((), p.discovery.reconnects)],
            "forwarder_positions_saves_total": [((), p.checkpointer.saves)],
            "forwarder_tasks": [((), len(asyncio.all_tasks()))],
        }
        if p.delivery_lag_s is not None:
            out["forwarder_delivery_lag_seconds"] = [((), p.delivery_lag_s)]
        connections = p.engine.open_connections()
        if connections is not None:
            out["forwarder_engine_connections"] = [((), connections)]
        output = p.output
        servers = getattr(output, "servers", None)
        if servers is not None:
            out["forwarder_chunks_sent_total"] = [((), getattr(output, "chunks_sent", 0))]
            out["forwarder_chunks_retried_total"] = [((), getattr(output, "chunks_retried", 0))]
            out["forwarder_server_up"] = [
                ((s.name,), float(s.health.state is ServerState.UP)) for s in servers
            ]
            out["forwarder_server_chunks_delivered_total"] = [
                ((s.name,), s.chunks_delivered) for s in servers
            ]
            out["forwarder_server_failures_total"] = [
                ((s.name, reason), count) for s in servers for reason, count in s.failures.items()
            ]
            out["forwarder_server_connections_total"] = [
                ((s.name,), s.connection.generation) for s in servers
            ]
            out["forwarder_server_connected"] = [
                ((s.name,), float(s.connection.is_open)) for s in servers
            ]
        else:  # stdout mode: every chunk goes once
            out["forwarder_chunks_sent_total"] = [((), p.chunks_delivered)]
            out["forwarder_chunks_retried_total"] = [((), 0)]
        return out


def registry_for(pipeline: Pipeline) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineMetrics(pipeline))
    return registry


def metrics_reference() -> str:
    """The README's table of metrics."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        meaning = m.help.replace("|", "\\|")
        lines.append(f"| `{m.name}` | {m.type} | {labels} | {meaning} |")
    return "\n".join(lines)
