"""The Forward encoder and the client connection state machine, without sockets."""

from __future__ import annotations

import base64
import gzip

import msgpack
import pytest

from forwarder.docker.frames import LogLine
from forwarder.events import ContainerId, EventTime, LogEvent, Position
from forwarder.forward.protocol import (
    Acked,
    Chunk,
    Chunker,
    ChunkId,
    ClientConnection,
    ConnState,
    Helo,
    LocalProtocolError,
    RemoteProtocolError,
    decode_entries,
    encode_entries,
    encode_log_entries,
    encode_message,
    event_time,
    new_chunk_id,
)

CID = "0123456789abcdef" * 4


def unpack_all(data: bytes) -> list[object]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


def test_event_time_is_ext_0_with_big_endian_seconds_and_nanoseconds() -> None:
    ext = event_time(1_764_054_754_123_456_789)
    assert ext.code == 0
    assert ext.data == (1_764_054_754).to_bytes(4, "big") + (123_456_789).to_bytes(4, "big")


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 65535, 65536, 70000])
def test_log_entries_decode_back_to_the_driver_keys(count: int) -> None:
    lines = [
        LogLine("stdout" if i % 2 else "stderr", 1_700_000_000_000_000_000 + i, f"line {i}")
        for i in range(count)
    ]
    data = encode_log_entries(CID, "/web", lines)
    entries = unpack_all(data)
    assert len(entries) == count
    for i, (time, record) in enumerate(entries):  # type: ignore[misc]
        assert time.code == 0
        assert EventTime(*divmod(lines[i].ts_ns, 10**9)) == EventTime(
            int.from_bytes(time.data[:4], "big"), int.from_bytes(time.data[4:], "big")
        )
        assert record == {
            "container_id": CID,
            "container_name": "/web",
            "source": lines[i].source,
            "log": f"line {i}",
        }
        LogEvent.model_validate(record)  # exactly the model's keys, nothing else


def test_log_entries_equal_the_generic_encoding_of_the_model() -> None:
    lines = [
        LogLine("stderr", 1_700_000_000_999_999_999, "ünï €"),
        LogLine("stdout", 5, "x" * 70000),
    ]
    generic = encode_entries(
        [
            (
                line.ts_ns,
                LogEvent(
                    container_id=CID, container_name="/w", source=line.source, log=line.text
                ).record(),
            )  # type: ignore[arg-type]
            for line in lines
        ]
    )
    assert encode_log_entries(CID, "/w", lines) == generic


def test_entries_with_arbitrary_records_round_trip() -> None:
    data = encode_entries([(5_000_000_001, {"a": 1}), (6_000_000_000, {"b": [1, 2]})])
    assert list(decode_entries(data)) == [
        (EventTime(5, 1), {"a": 1}),
        (EventTime(6, 0), {"b": [1, 2]}),
    ]


def test_packed_forward_message_shape() -> None:
    entries = encode_entries([(1, {"k": "v"})])
    chunk_id = new_chunk_id()
    tag, body, options = msgpack.unpackb(
        encode_message("docker.web", entries, 1, chunk_id=chunk_id), raw=False
    )
    assert tag == "docker.web"
    assert isinstance(body, bytes) and body == entries  # entries travel as bin
    assert options == {"size": 1, "chunk": chunk_id}


def test_no_chunk_option_without_ack() -> None:
    message = msgpack.unpackb(encode_message("t", b"", 0, chunk_id=None), raw=False)
    assert message[2] == {"size": 0}


def test_gzip_message_is_compressed_packed_forward() -> None:
    entries = encode_entries([(1, {"log": "x" * 1000})] * 50)
    _tag, body, options = msgpack.unpackb(
        encode_message("t", entries, 50, chunk_id=ChunkId("abc"), compress=True), raw=False
    )
    assert options == {"size": 50, "chunk": "abc", "compressed": "gzip"}
    assert len(body) < len(entries) / 10
    assert gzip.decompress(body) == entries


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
    assert sealed.tag == "a" and sealed.count == 2
    assert msgpack.unpackb(sealed.payload, raw=False)[1] == b"\x01\x03"
    assert chunker.next_deadline() == 1.5
    (rest,) = chunker.flush_all()
    assert rest.tag == "b" and rest.seq > sealed.seq


def test_chunker_seals_before_exceeding_the_limit() -> None:
    chunker = make_chunker(limit=100)
    assert chunker.add("t", b"x" * 60, 1, now=0) == []
    (first,) = chunker.add("t", b"y" * 60, 1, now=0)  # 120 > 100: the first 60 go alone
    assert msgpack.unpackb(first.payload, raw=False)[1] == b"x" * 60
    (second,) = chunker.add("t", b"z" * 40, 1, now=0)  # reaches 100 exactly: sealed at once
    assert msgpack.unpackb(second.payload, raw=False)[1] == b"y" * 60 + b"z" * 40
    assert chunker.flush_all() == []


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


# --- connection state machine -------------------------------------------------------------


def chunk(chunk_id: str = "id-1") -> Chunk:
    payload = encode_message("t", b"", 0, chunk_id=ChunkId(chunk_id))
    return Chunk(1, ChunkId(chunk_id), "t", payload, 0)


def test_ack_round_trip_fed_byte_by_byte() -> None:
    conn = ClientConnection(handshake=False)
    assert conn.state is ConnState.READY
    assert conn.send_chunk(chunk(), expect_ack=True) == chunk().payload
    assert conn.state is ConnState.AWAITING_ACK
    reply = msgpack.packb({"ack": "id-1"})
    for byte in reply[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is None
    conn.receive_data(reply[-1:])
    assert conn.next_event() == Acked(ChunkId("id-1"))
    assert conn.state is ConnState.READY


def test_ack_as_bin_is_accepted() -> None:
    conn = ClientConnection(handshake=False)
    conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(msgpack.packb({"ack": b"id-1"}, use_bin_type=True))
    assert conn.next_event() == Acked(ChunkId("id-1"))


def test_ack_for_an_unknown_chunk_is_the_servers_fault() -> None:
    conn = ClientConnection(handshake=False)
    conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(msgpack.packb({"ack": "id-2"}))
    with pytest.raises(RemoteProtocolError, match="unknown chunk"):
        conn.next_event()


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1", msgpack.packb("hello"), msgpack.packb([1, 2, 3]), b"\x92\xc1\xc1"],
)
def test_garbage_from_the_server_is_a_remote_error(garbage: bytes) -> None:
    conn = ClientConnection(handshake=False)
    conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(garbage)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_an_endless_reply_is_capped() -> None:
    conn = ClientConnection(handshake=False)
    conn.send_chunk(chunk(), expect_ack=True)
    with pytest.raises(RemoteProtocolError, match="without a complete message"):
        for _ in range(20):
            conn.receive_data(b"\xdb\xff\xff\xff\xff" + b"x" * 100_000)  # a 4 GiB str header


def test_pipelined_chunks_await_their_acks_together() -> None:
    conn = ClientConnection(handshake=False)
    conn.send_chunk(chunk(), expect_ack=True)
    conn.send_chunk(chunk("id-2"), expect_ack=True)
    assert conn.awaiting_acks == 2
    conn.receive_data(msgpack.packb({"ack": "id-1"}) + msgpack.packb({"ack": "id-2"}))
    assert conn.next_event() == Acked(ChunkId("id-1"))
    assert conn.state is ConnState.AWAITING_ACK
    assert conn.next_event() == Acked(ChunkId("id-2"))
    assert conn.state is ConnState.READY
    assert conn.awaiting_acks == 0


def test_sending_a_chunk_that_already_awaits_its_ack_is_our_bug() -> None:
    conn = ClientConnection(handshake=False)
    conn.send_chunk(chunk(), expect_ack=True)
    with pytest.raises(LocalProtocolError):
        conn.send_chunk(chunk(), expect_ack=True)


def test_handshake_states() -> None:
    conn = ClientConnection(handshake=True)
    assert conn.state is ConnState.AWAITING_HELO
    with pytest.raises(LocalProtocolError):
        conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(msgpack.packb(["HELO", {"nonce": b"n", "auth": b"", "keepalive": True}]))
    event = conn.next_event()
    assert isinstance(event, Helo)
    assert conn.state is ConnState.AWAITING_PONG
    conn.handshake_done()
    assert conn.state is ConnState.READY


def test_data_before_helo_is_refused() -> None:
    conn = ClientConnection(handshake=True)
    conn.receive_data(msgpack.packb({"ack": "x"}))
    with pytest.raises(RemoteProtocolError, match="expected HELO"):
        conn.next_event()
