"""The test receivers: decoding without sockets, then the real servers over loopback."""

from __future__ import annotations

import gzip
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from forwarder.forward.handshake import PingCheck, check_ping
from tests.harness.receivers import (
    GARBAGE,
    CountingReceiver,
    EventTime,
    ForwardEntries,
    ForwardEntry,
    ForwardReceiver,
    NodeReceiver,
    SenderProtocolError,
    count_packed_entries,
    decode_forward_message,
    lean_message,
    new_unpacker,
    server_tls_context,
    sha512_hex,
    time_to_ns,
)

T0 = EventTime(1_700_000_000, 123_456_789)


def event_time(t: EventTime) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", t.seconds, t.nanoseconds))


def pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def packed_entries(*records: dict[str, Any], t: EventTime = T0) -> bytes:
    return b"".join(pack([event_time(t), r]) for r in records)


def unpack_one(data: bytes) -> object:
    unpacker = new_unpacker()
    unpacker.feed(data)
    (obj,) = list(unpacker)
    return obj


# ---- decoding, no sockets ---------------------------------------------------------------


def test_decode_message_mode_with_event_time() -> None:
    obj = unpack_one(pack(["app", event_time(T0), {"log": "hi"}, {"chunk": "c1"}]))
    assert decode_forward_message(obj) == [ForwardEntry("app", T0, {"log": "hi"}, {"chunk": "c1"})]
    assert time_to_ns(T0) == 1_700_000_000_123_456_789


def test_decode_accepts_a_raw_ext_type_and_plain_numbers() -> None:
    entries = decode_forward_message(["t", [[event_time(T0), {"a": 1}], [17, {"a": 2}]]])
    assert [(e.time, e.record) for e in entries] == [(T0, {"a": 1}), (17, {"a": 2})]
    assert entries[0].options == {}
    assert time_to_ns(1.5) == 1_500_000_000
    assert time_to_ns(17) == 17_000_000_000


def test_decode_packed_forward_bin() -> None:
    payload = packed_entries({"n": 1}, {"n": 2}, {"n": 3})
    obj = unpack_one(pack(["tag", payload, {"size": 3, "chunk": "abc"}]))
    entries = decode_forward_message(obj)
    assert [e.record["n"] for e in entries] == [1, 2, 3]
    assert {e.time for e in entries} == {T0}
    assert entries[0].options == {"size": 3, "chunk": "abc"}


def test_decode_packed_forward_sent_as_str_like_fluentd() -> None:
    # Fluentd's out_forward sends the entries as a msgpack str; the bytes must survive.
    payload = packed_entries({"log": "caf\u00e9"}, {"log": "x"})
    wire = msgpack.packb(["tag", payload, {}], use_bin_type=False)
    assert wire[5] & 0xE0 == 0xA0 or wire[5] in (0xD9, 0xDA, 0xDB)  # a str header
    entries = decode_forward_message(unpack_one(wire))
    assert [e.record["log"] for e in entries] == ["caf\u00e9", "x"]


def test_decode_compressed_packed_forward_with_several_gzip_members() -> None:
    first = gzip.compress(packed_entries({"n": 1}, {"n": 2}))
    second = gzip.compress(packed_entries({"n": 3}))
    obj = unpack_one(pack(["tag", first + second, {"compressed": "gzip", "size": 3}]))
    assert [e.record["n"] for e in decode_forward_message(obj)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ("not a list", "not a Forward message"),
        (["tag"], "not a Forward message"),
        (["tag", 1], "Message of 2 elements"),
        (["tag", 1, "not a map"], "record is str"),
        (["tag", "soon", {"a": 1}], "not \\[time, record\\]"),
        ([1, 1, {}], "tag is int"),
        (["tag", [[1]]], "not \\[time, record\\]"),
        (["tag", [["noon", {}]]], "neither EventTime nor a number"),
        (["tag", msgpack.ExtType(0, b"\0" * 4), {}], "4 bytes"),
        (["tag", b"x", {"compressed": "zstd"}], "unknown compression"),
        (["tag", b"not gzip", {"compressed": "gzip"}], "bad gzip"),
        (["tag", pack([1, {}]) + b"\x92", {}], "incomplete"),
        (["tag", pack([1, 2]), {}], "record is int"),
        (["tag", [], "opt"], "option is str"),
    ],
)
def test_decode_rejects_what_the_spec_does_not_allow(obj: object, match: str) -> None:
    with pytest.raises(SenderProtocolError, match=match):
        decode_forward_message(obj)


def test_count_packed_entries_skips_without_decoding() -> None:
    assert count_packed_entries(b"") == 0
    assert count_packed_entries(packed_entries(*({"i": i} for i in range(1000)))) == 1000


def ping_message(
    nonce: bytes,
    key: str,
    hostname: str = "client-host",
    *,
    auth_salt: bytes = b"",
    user: str = "",
    password: str = "",
) -> list[object]:
    salt = b"0123456789abcdef"
    password_digest = sha512_hex(auth_salt, user, password) if user else ""
    return ["PING", hostname, salt, sha512_hex(salt, hostname, nonce, key), user, password_digest]


def test_the_receivers_check_pings_with_the_handshake_modules_server_side() -> None:
    nonce = b"n" * 16

    def check(ping: object, auth_salt: bytes = b"", users: dict[str, str] | None = None) -> Any:
        return check_ping(ping, nonce, auth_salt, "k", users or {}, server_hostname="srv")

    assert check(ping_message(nonce, "k")) == PingCheck(
        True, "", b"0123456789abcdef", "client-host"
    )
    assert check(ping_message(nonce, "wrong"))[:2] == (False, "shared_key mismatch")
    assert check(ping_message(nonce, "k", "srv"))[:2] == (
        False,
        "same hostname between input and output: invalid configuration",
    )

    salt = b"a" * 16
    users = {"alice": "secret"}
    good = ping_message(nonce, "k", auth_salt=salt, user="alice", password="secret")
    bad = ping_message(nonce, "k", auth_salt=salt, user="alice", password="guess")
    assert check(good, salt, users).ok
    assert check(bad, salt, users)[:2] == (False, "username/password mismatch")
    assert check(["PONG"]) == PingCheck(False, "invalid ping message", b"", "")


# ---- a tiny Forward client for the socket tests -----------------------------------------


class Client:
    """msgpack over a plain (or TLS) socket, reads bounded by a timeout."""

    def __init__(self, address: str, *, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=10.0)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.unpacker = msgpack.Unpacker(raw=False)

    def send(self, obj: object) -> None:
        self.sock.sendall(pack(obj))

    def read(self) -> object:
        while True:
            for obj in self.unpacker:
                return obj
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the receiver")
            self.unpacker.feed(data)

    def handshake(self, key: str, hostname: str = "client-host", **auth: Any) -> list[Any]:
        helo = self.read()
        assert isinstance(helo, list)
        assert helo[0] == "HELO"
        options = helo[1]
        self.nonce: bytes = options["nonce"]
        self.send(ping_message(self.nonce, key, hostname, auth_salt=options["auth"], **auth))
        pong = self.read()
        assert isinstance(pong, list)
        assert pong[0] == "PONG"
        return pong

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(address: str, **kw: Any) -> Client:
        clients.append(Client(address, **kw))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


# ---- ForwardReceiver --------------------------------------------------------------------


def test_forward_receiver_stores_records_and_acks(
    forward_receiver: ForwardReceiver, connect: Callable[..., Client]
) -> None:
    client = connect(forward_receiver.address)
    client.send(["docker.app", packed_entries({"log": "a"}, {"log": "b"}), {"chunk": "c-1"}])
    assert client.read() == {"ack": "c-1"}
    client.send(["docker.app", event_time(T0), {"log": "c"}])  # no chunk: no ack expected

    records = forward_receiver.wait_for(3)
    assert [r["record"]["log"] for r in records] == ["a", "b", "c"]
    assert records[0] == {
        "tag": "docker.app",
        "time_ns": T0.ns,
        "record": {"log": "a"},
        "chunk_id": "c-1",
        "conn": 1,
    }
    assert records[2]["chunk_id"] is None
    assert forward_receiver.chunk_ids == ["c-1"]
    assert forward_receiver.acks_sent == ["c-1"]
    assert forward_receiver.messages_received == 2
    assert forward_receiver.errors == []


def test_forward_receiver_wait_for_fails_at_its_deadline(forward_receiver: ForwardReceiver) -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="0 records"):
        forward_receiver.wait_for(1, timeout=0.2)
    assert time.monotonic() - started >= 0.2


def test_forward_receiver_without_ack_never_acks(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(ack=False)
    client = connect(receiver.address)
    client.send(["t", [[1, {"n": 1}]], {"chunk": "unacked"}])
    receiver.wait_for(1)
    receiver.ack = True
    client.send(["t", [[2, {"n": 2}]], {"chunk": "acked"}])
    # The connection is served in order: had "unacked" been acked, that ack would come first.
    assert client.read() == {"ack": "acked"}
    assert receiver.chunk_ids == ["unacked", "acked"]


def test_forward_receiver_garbage_answers_undecodable_bytes(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(garbage=True)
    client = connect(receiver.address)
    client.send(["t", [[1, {"n": 1}]], {"chunk": "c"}])
    data = b""
    while len(data) < len(GARBAGE):
        data += client.sock.recv(100)
    assert data == GARBAGE
    with pytest.raises(msgpack.FormatError):
        msgpack.unpackb(data)
    assert receiver.wait_for(1)[0]["record"] == {"n": 1}


def test_forward_receiver_ack_delay(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(ack_delay=0.3)
    client = connect(receiver.address)
    started = time.monotonic()
    client.send(["t", [[1, {}]], {"chunk": "slow"}])
    assert client.read() == {"ack": "slow"}
    assert time.monotonic() - started >= 0.3


def test_forward_receiver_resets_after_n_chunks(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(close_after_n_chunks=2)
    client = connect(receiver.address)
    client.send(["t", [[1, {"n": 1}]], {"chunk": "one"}])
    assert client.read() == {"ack": "one"}
    client.send(["t", [[1, {"n": 2}]], {"chunk": "two"}])
    with pytest.raises((ConnectionResetError, ConnectionError)):
        client.read()
    receiver.wait_for_condition(lambda: receiver.messages_dropped == 1)
    assert [r["record"]["n"] for r in receiver.records] == [1]

    # A new connection gets its own count.
    again = connect(receiver.address)
    again.send(["t", [[1, {"n": 3}]], {"chunk": "three"}])
    assert again.read() == {"ack": "three"}
    assert [r["conn"] for r in receiver.wait_for(2)] == [1, 2]


def test_forward_receiver_stop_and_start_on_the_same_port(
    forward_receiver: ForwardReceiver, connect: Callable[..., Client]
) -> None:
    client = connect(forward_receiver.address)
    port = forward_receiver.port
    forward_receiver.stop()
    with pytest.raises(ConnectionError):
        client.read()  # the outage closed the open connection too
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5.0)

    forward_receiver.start()
    assert forward_receiver.port == port
    again = connect(forward_receiver.address)
    again.send(["t", [[1, {"after": True}]], {"chunk": "back"}])
    assert again.read() == {"ack": "back"}


def test_forward_receiver_records_protocol_errors(
    forward_receiver: ForwardReceiver, connect: Callable[..., Client]
) -> None:
    client = connect(forward_receiver.address)
    client.send(["t", 1, "not a record"])
    with pytest.raises(ConnectionError):
        client.read()
    forward_receiver.wait_for_condition(lambda: bool(forward_receiver.errors))
    assert "record is str" in forward_receiver.errors[0]


def test_forward_receiver_handshake(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(shared_key="s3cret", self_hostname="recv")
    client = connect(receiver.address)
    pong = client.handshake("s3cret")
    salt = b"0123456789abcdef"
    assert pong == ["PONG", True, "", "recv", sha512_hex(salt, "recv", client.nonce, "s3cret")]
    client.send(["t", [[1, {"n": 1}]], {"chunk": "c"}])
    assert client.read() == {"ack": "c"}

    intruder = connect(receiver.address)
    assert intruder.handshake("guess")[:3] == ["PONG", False, "shared_key mismatch"]
    with pytest.raises(ConnectionError):
        intruder.read()
    assert receiver.auth_failures == ["shared_key mismatch"]


def test_forward_receiver_user_auth(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(shared_key="k", users={"alice": "pw"})
    assert connect(receiver.address).handshake("k", user="alice", password="pw")[1] is True
    assert connect(receiver.address).handshake("k", user="alice", password="no")[1] is False
    assert receiver.auth_failures == ["username/password mismatch"]


def test_forward_receiver_bad_pong_digest(
    make_forward_receiver: Callable[..., ForwardReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_forward_receiver(shared_key="k", self_hostname="recv", bad_pong_digest=True)
    client = connect(receiver.address)
    pong = client.handshake("k")
    assert pong[1] is True
    assert pong[4] != sha512_hex(b"0123456789abcdef", "recv", client.nonce, "k")


def test_forward_receiver_over_tls(
    make_forward_receiver: Callable[..., ForwardReceiver],
    connect: Callable[..., Client],
    tmp_path: Path,
) -> None:
    certs = pytest.importorskip("tests.harness.certs")
    pki = certs.make_pki(tmp_path)
    receiver = make_forward_receiver(tls=server_tls_context(pki.server.cert, pki.server.key))
    client_context = ssl.create_default_context(cafile=str(pki.ca.cert))
    client = connect(receiver.address, tls=client_context)
    client.send(["t", [[1, {"secure": True}]], {"chunk": "tls"}])
    assert client.read() == {"ack": "tls"}
    assert receiver.wait_for(1)[0]["record"] == {"secure": True}


# ---- CountingReceiver -------------------------------------------------------------------


def test_counting_receiver_counts_every_mode_and_acks(
    counting_receiver: CountingReceiver, connect: Callable[..., Client]
) -> None:
    client = connect(counting_receiver.address)
    client.send(["t", packed_entries(*({"i": i} for i in range(100))), {"chunk": "p"}])
    assert client.read() == {"ack": "p"}
    gz = gzip.compress(packed_entries({"i": 0})) + gzip.compress(packed_entries({"i": 1}))
    client.send(["t", gz, {"compressed": "gzip", "chunk": "z"}])
    assert client.read() == {"ack": "z"}
    client.send(["t", [[1, {}], [2, {}]]])
    client.send(["t", event_time(T0), {}])
    assert counting_receiver.wait_for(105) == 105
    stats = counting_receiver.stats()
    assert stats["messages"] == 4
    assert stats["errors"] == 0
    assert stats["bytes"] > 100 * 8


def test_lean_message_leaves_forward_mode_entries_as_their_bytes() -> None:
    records: list[dict[str, Any]] = [{"i": 0}, {"i": 1, "s": "x"}]
    message = pack(["t", [[event_time(T0), r] for r in records], {"chunk": "c"}])
    assert lean_message(message) == [
        b"t",
        ForwardEntries(2, packed_entries(*records)),
        {b"chunk": b"c"},
    ]


def test_lean_message_decodes_every_other_shape_whole() -> None:
    packed = packed_entries({"i": 0})
    assert lean_message(pack(["t", packed, {"size": 1}])) == [b"t", packed, {b"size": 1}]
    assert lean_message(pack(["t", 7, {"m": 1}])) == [b"t", 7, {b"m": 1}]
    assert lean_message(pack({"ack": "a"})) == {b"ack": b"a"}


def test_counting_receiver_splits_messages_cut_anywhere(
    counting_receiver: CountingReceiver, connect: Callable[..., Client]
) -> None:
    client = connect(counting_receiver.address)
    data = pack(["t", [[1, {"i": i}] for i in range(50)], {"chunk": "a"}])
    data += pack(["t", packed_entries({"i": 0}), {"chunk": "b"}])
    for i in range(len(data)):
        client.sock.sendall(data[i : i + 1])
    assert client.read() == {"ack": "a"}
    assert client.read() == {"ack": "b"}
    assert counting_receiver.wait_for(51) == 51


# ---- NodeReceiver (Fluent's FluentServer from @fluent-org/logger) ------------------------


def test_node_receiver_receives_message_and_packed_forward(
    node_receiver: NodeReceiver, connect: Callable[..., Client]
) -> None:
    client = connect(node_receiver.address)
    client.send(["docker.app", event_time(T0), {"log": "from python"}, {"chunk": "m-1"}])
    assert client.read() == {"ack": "m-1"}
    client.send(["docker.app", packed_entries({"n": 1}, {"n": 2}), {"chunk": "p-1"}])
    assert client.read() == {"ack": "p-1"}

    records = node_receiver.wait_for(3)
    assert records[0]["tag"] == "docker.app"
    assert records[0]["record"] == {"log": "from python"}
    assert records[0]["time"] == [T0.seconds, T0.nanoseconds]
    assert records[0]["time_ns"] == T0.ns
    assert [r["record"] for r in records[1:]] == [{"n": 1}, {"n": 2}]
    node_receiver.wait_for_condition(lambda: node_receiver.acked == ["m-1", "p-1"])


def test_node_receiver_restarts_on_the_same_port(
    node_receiver: NodeReceiver, connect: Callable[..., Client]
) -> None:
    port = node_receiver.port
    node_receiver.restart()
    assert node_receiver.port == port
    assert node_receiver.starts == 2
    client = connect(node_receiver.address)
    client.send(["t", [[1, {"after": "restart"}]], {"chunk": "r"}])
    assert client.read() == {"ack": "r"}
    assert node_receiver.wait_for(1)[0]["record"] == {"after": "restart"}


def test_node_receiver_without_ack(
    make_node_receiver: Callable[..., NodeReceiver], connect: Callable[..., Client]
) -> None:
    receiver = make_node_receiver(ack=False)
    client = connect(receiver.address)
    client.send(["t", [[1, {"n": 1}]], {"chunk": "never"}])
    receiver.wait_for(1)
    # The library writes an ack before it reports the entries, so one would be here by now.
    client.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.sock.recv(100)


def test_node_receiver_shared_key_and_user_auth(
    make_node_receiver: Callable[..., NodeReceiver], connect: Callable[..., Client]
) -> None:
    security = {
        "serverHostname": "node-recv",
        "sharedKey": "k",
        "authorize": True,
        "userDict": {"alice": "pw"},
    }
    receiver = make_node_receiver(security=security)
    client = connect(receiver.address)
    pong = client.handshake("k", user="alice", password="pw")
    salt = b"0123456789abcdef"
    assert pong == ["PONG", True, "", "node-recv", sha512_hex(salt, "node-recv", client.nonce, "k")]
    client.send(["t", [[1, {"authed": True}]], {"chunk": "a"}])
    assert client.read() == {"ack": "a"}

    intruder = connect(receiver.address)
    assert intruder.handshake("wrong-key", user="alice", password="pw")[1] is False
    receiver.wait_for_condition(lambda: receiver.auth_failures == ["shared key mismatch"])


def test_node_receiver_over_tls(
    make_node_receiver: Callable[..., NodeReceiver],
    connect: Callable[..., Client],
    tmp_path: Path,
) -> None:
    certs = pytest.importorskip("tests.harness.certs")
    pki = certs.make_pki(tmp_path)
    receiver = make_node_receiver(tls={"key": pki.server.key, "cert": pki.server.cert})
    client_context = ssl.create_default_context(cafile=str(pki.ca.cert))
    client = connect(receiver.address, tls=client_context)
    client.send(["t", [[1, {"secure": True}]], {"chunk": "tls"}])
    assert client.read() == {"ack": "tls"}
    assert receiver.wait_for(1)[0]["record"] == {"secure": True}
