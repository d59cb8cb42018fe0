"""The Forward encoder and the client connection state machine, without sockets."""

from __future__ import annotations

import gzip
from typing import Any

import msgpack
import pytest

from forwarder.chunks import Chunk, ChunkId, new_chunk_id
from forwarder.forward.handshake import (
    AuthRefusedError,
    ClientHandshake,
    Credentials,
    HandshakeProtocolError,
    check_ping,
    make_helo,
    make_pong,
)
from forwarder.forward.protocol import (
    Acked,
    ClientConnection,
    ConnState,
    Helo,
    LocalProtocolError,
    Pong,
    RemoteProtocolError,
    decode_entries,
    encode_entries,
    encode_log_entries,
    encode_message,
    event_time,
    log_head,
)
from forwarder.records import EventTime, LogEvent, LogLine
from tests.helpers import CID, feed_all


def unpack_all(data: bytes) -> list[Any]:
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
    for i, (time, record) in enumerate(entries):
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
            )
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
    assert isinstance(body, bytes)
    assert body == entries
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


# --- connection state machine -------------------------------------------------------------


def state(conn: ClientConnection[Any]) -> ConnState:
    """The connection's state, read through a call: mypy would keep ``conn.state`` narrowed
    to the value last asserted, past the calls that change it."""
    return conn.state


def chunk(chunk_id: str = "id-1") -> Chunk:
    payload = encode_message("t", b"", 0, chunk_id=ChunkId(chunk_id))
    return Chunk.of(ChunkId(chunk_id), "t", payload, 0, seq=1)


def test_ack_round_trip_fed_byte_by_byte() -> None:
    conn: ClientConnection[None] = ClientConnection()
    assert state(conn) is ConnState.READY
    assert conn.send_chunk(chunk(), expect_ack=True) == chunk().payload
    assert state(conn) is ConnState.AWAITING_ACK
    reply = msgpack.packb({"ack": "id-1"})
    for byte in reply[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is None
    conn.receive_data(reply[-1:])
    assert conn.next_event() == Acked(ChunkId("id-1"))
    assert state(conn) is ConnState.READY


def test_ack_as_bin_is_accepted() -> None:
    conn: ClientConnection[None] = ClientConnection()
    conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(msgpack.packb({"ack": b"id-1"}, use_bin_type=True))
    assert conn.next_event() == Acked(ChunkId("id-1"))


def test_ack_for_an_unknown_chunk_is_the_servers_fault() -> None:
    conn: ClientConnection[None] = ClientConnection()
    conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(msgpack.packb({"ack": "id-2"}))
    with pytest.raises(RemoteProtocolError, match="unknown chunk"):
        conn.next_event()


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1", msgpack.packb("hello"), msgpack.packb([1, 2, 3]), b"\x92\xc1\xc1"],
)
def test_garbage_from_the_server_is_a_remote_error(garbage: bytes) -> None:
    conn: ClientConnection[None] = ClientConnection()
    conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(garbage)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_an_endless_reply_is_capped() -> None:
    conn: ClientConnection[None] = ClientConnection()
    conn.send_chunk(chunk(), expect_ack=True)
    reply = b"\xdb\xff\xff\xff\xff" + b"x" * 100_000  # a 4 GiB str header, and more
    with pytest.raises(RemoteProtocolError, match="without a complete message"):
        feed_all(conn.receive_data, *[reply] * 20)


def test_pipelined_chunks_await_their_acks_together() -> None:
    conn: ClientConnection[None] = ClientConnection()
    conn.send_chunk(chunk(), expect_ack=True)
    conn.send_chunk(chunk("id-2"), expect_ack=True)
    assert conn.awaiting_acks == 2
    conn.receive_data(msgpack.packb({"ack": "id-1"}) + msgpack.packb({"ack": "id-2"}))
    assert conn.next_event() == Acked(ChunkId("id-1"))
    assert state(conn) is ConnState.AWAITING_ACK
    assert conn.next_event() == Acked(ChunkId("id-2"))
    assert state(conn) is ConnState.READY
    assert conn.awaiting_acks == 0


def test_sending_a_chunk_that_already_awaits_its_ack_is_our_bug() -> None:
    conn: ClientConnection[None] = ClientConnection()
    conn.send_chunk(chunk(), expect_ack=True)
    with pytest.raises(LocalProtocolError):
        conn.send_chunk(chunk(), expect_ack=True)


NONCE = b"nonce-0123456789"
SHARED_KEY = "k3y"


def handshaking() -> ClientConnection[None]:
    return ClientConnection(ClientHandshake(Credentials("client", SHARED_KEY)))


def test_the_connection_owns_the_handshake_from_helo_to_ready() -> None:
    conn = handshaking()
    assert state(conn) is ConnState.AWAITING_HELO
    assert conn.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        conn.send_chunk(chunk(), expect_ack=True)
    conn.receive_data(make_helo(NONCE, b"", keepalive=True))
    assert isinstance(conn.next_event(), Helo)
    assert state(conn) is ConnState.AWAITING_PONG
    ping = msgpack.unpackb(conn.data_to_send(), raw=False)
    assert conn.data_to_send() == b""  # handed out once
    verdict = check_ping(ping, NONCE, b"", SHARED_KEY, {})
    assert verdict.ok
    conn.receive_data(make_pong(True, "", "server", verdict.shared_key_salt, NONCE, SHARED_KEY))
    assert isinstance(conn.next_event(), Pong)
    assert state(conn) is ConnState.READY
    assert conn.keepalive
    conn.send_chunk(chunk(), expect_ack=True)
    assert state(conn) is ConnState.AWAITING_ACK


def test_keepalive_false_in_the_helo_is_the_connections() -> None:
    conn = handshaking()
    conn.receive_data(make_helo(NONCE, b"", keepalive=False))
    conn.next_event()
    assert not conn.keepalive


def test_a_pong_that_fails_its_checks_closes_the_connection() -> None:
    conn = handshaking()
    conn.receive_data(make_helo(NONCE, b""))
    conn.next_event()
    salt = check_ping(msgpack.unpackb(conn.data_to_send(), raw=False), NONCE, b"", "", {})
    conn.receive_data(make_pong(True, "", "server", salt.shared_key_salt, NONCE, "wrong"))
    with pytest.raises(HandshakeProtocolError, match="shared key mismatch"):
        conn.next_event()
    assert state(conn) is ConnState.CLOSED


def test_a_refusing_pong_carries_the_reason_and_closes_the_connection() -> None:
    conn = handshaking()
    conn.receive_data(make_helo(NONCE, b""))
    conn.next_event()
    conn.receive_data(make_pong(False, "shared_key mismatch", "", b"", NONCE, SHARED_KEY))
    with pytest.raises(AuthRefusedError, match="shared_key mismatch"):
        conn.next_event()
    assert state(conn) is ConnState.CLOSED


def test_a_lost_connection_hands_back_the_waiters_oldest_first() -> None:
    conn: ClientConnection[str] = ClientConnection()
    conn.send_chunk(chunk("a"), expect_ack=True, waiter="first")
    conn.send_chunk(chunk("b"), expect_ack=True, waiter="second")
    conn.receive_data(msgpack.packb({"ack": "a"}))
    assert conn.next_event() == Acked(ChunkId("a"), "first")
    assert conn.awaiting_acks == 1
    assert conn.connection_lost() == ["second"]
    assert conn.awaiting_acks == 0
    assert state(conn) is ConnState.CLOSED


def test_data_before_helo_is_refused() -> None:
    conn = handshaking()
    conn.receive_data(msgpack.packb({"ack": "x"}))
    with pytest.raises(RemoteProtocolError, match="expected HELO"):
        conn.next_event()


@pytest.mark.parametrize(
    "extra",
    [
        {"team": "pay", "APP_VERSION": "1.2"},
        {f"k{i}": str(i) for i in range(20)},  # a map16 header
        {"docker": {"image": "nginx", "host": "node-1"}},
        # A key equal to one of the driver's four replaces its value, as the driver does.
        {"container_name": "/renamed", "source": "label", "log": "the label", "z": "1"},
    ],
)
def test_log_entries_with_extra_keys_equal_the_generic_encoding(extra: dict[str, Any]) -> None:
    lines = [LogLine("stderr", 1_700_000_000_999_999_999, "ünï €"), LogLine("stdout", 5, "x")]
    generic = encode_entries(
        [
            (
                line.ts_ns,
                {
                    **LogEvent(
                        container_id=CID, container_name="/w", source=line.source, log=line.text
                    ).record(),
                    **extra,
                },
            )
            for line in lines
        ]
    )
    assert encode_log_entries(CID, "/w", lines, extra) == generic
    head = log_head(CID, "/w", extra)
    assert encode_log_entries(CID, "/w", lines, head=head) == generic
