"""The chunk assembler: grouping by tag, sealing by size or age, positions, chunk ids."""

from __future__ import annotations

import base64

import msgpack
import pytest

from forwarder.chunks import Chunker, new_chunk_id
from forwarder.records import ContainerId, Position


def test_chunk_ids_are_unique_base64() -> None:
    ids = {new_chunk_id() for _ in range(1000)}
    assert len(ids) == 1000
    for chunk_id in list(ids)[:10]:
        assert len(base64.b64decode(chunk_id, validate=True)) == 16


# --- chunker ------------------------------------------------------------------------------


def make_chunker(limit: int = 1000, interval: float = 1.0) -> Chunker:
    return Chunker(chunk_limit=limit, flush_interval_s=interval, require_ack=True, compress=False)


def test_chunker_groups_by_tag_and_seals_on_age() -> None:
    chunker = make_chunker()
    assert chunker.add("a", b"\x01", 1, now=0.0) == []
    assert chunker.add("b", b"\x02", 1, now=0.5) == []
    assert chunker.add("a", b"\x03", 1, now=0.6) == []
    assert chunker.next_deadline() == 1.0
    assert chunker.due(0.99) == []
    (sealed,) = chunker.due(1.0)
    assert sealed.tag == "a"
    assert sealed.count == 2
    assert msgpack.unpackb(sealed.payload, raw=False)[1] == b"\x01\x03"
    assert chunker.next_deadline() == 1.5
    (rest,) = chunker.flush_all()
    assert rest.tag == "b"
    assert rest.seq is not None
    assert sealed.seq is not None
    assert rest.seq > sealed.seq


def test_chunker_seals_before_exceeding_the_limit() -> None:
    chunker = make_chunker(limit=100)
    assert chunker.add("t", b"x" * 60, 1, now=0) == []
    (first,) = chunker.add("t", b"y" * 60, 1, now=0)  # 120 > 100: the first 60 go alone
    assert msgpack.unpackb(first.payload, raw=False)[1] == b"x" * 60
    (second,) = chunker.add("t", b"z" * 40, 1, now=0)  # reaches 100 exactly: sealed at once
    assert msgpack.unpackb(second.payload, raw=False)[1] == b"y" * 60 + b"z" * 40
    assert chunker.flush_all() == []


def test_chunker_keeps_the_highest_position_per_container() -> None:
    chunker = make_chunker()
    a, b = ContainerId("a" * 64), ContainerId("b" * 64)
    chunker.add("t", b"1", 1, 0, (a, Position(10, 1)))
    chunker.add("t", b"2", 1, 0, (b, Position(5, 1)))
    chunker.add("t", b"3", 1, 0, (a, Position(12, 2)))
    (chunk,) = chunker.flush_all()
    assert chunk.positions == {a: Position(12, 2), b: Position(5, 1)}


def test_a_sealed_chunk_never_changes() -> None:
    chunker = make_chunker()
    chunker.add("t", b"1", 1, 0)
    (chunk,) = chunker.flush_all()
    options = msgpack.unpackb(chunk.payload, raw=False)[2]
    assert options["chunk"] == chunk.chunk_id


def test_chunker_never_mixes_kinds_that_share_a_tag() -> None:
    """Tag templates may give stats and logs one tag; a chunk still holds one kind, so that
    the status line can count lines and records apart."""
    chunker = make_chunker()
    chunker.add("t", b"\x01", 2, now=0.0)
    chunker.add("t", b"\x02", 1, now=0.1, kind="stats")
    chunker.add("t", b"\x03", 1, now=0.2, kind="lifecycle")
    chunker.add("t", b"\x04", 3, now=0.3)
    chunks = chunker.flush_all()
    assert sorted((c.kind, c.count) for c in chunks) == [
        ("lifecycle", 1),
        ("log", 5),
        ("stats", 1),
    ]
    assert {c.tag for c in chunks} == {"t"}


def test_a_chunk_without_its_payload_refuses_to_give_it() -> None:
    (sealed,) = make_chunker(limit=100).add("a", b"x" * 100, 1, now=0.0)
    on_disk = sealed.without_payload()
    assert not on_disk.is_loaded
    assert on_disk.size == sealed.size
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = on_disk.payload
    assert on_disk.with_payload(sealed.payload) == sealed
