"""The Forward v1 handshake: golden vectors, every PONG check, states, and no leaked secrets."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest

from forwarder.forward.handshake import (
    AuthRefusedError,
    ClientHandshake,
    Credentials,
    HandshakeError,
    HandshakeProtocolError,
    HandshakeState,
    HandshakeUsageError,
    PingCheck,
    check_ping,
    make_helo,
    make_pong,
)

SHARED_KEY = "s3cr3t-shared"
PASSWORD = "pa55word"
CLIENT = "client.example"
SERVER = "server.example"
SALT = b"0123456789abcdef0123456789abcdef"
NONCE = bytes(range(16))
AUTH_SALT = bytes(range(0xA0, 0xB0))

# Made by an independent implementation, @fluent-org/logger 1.0.10 (tests/peers), from the
# values above: protocol.generatePing(...) and protocol.generatePong(...).
NODE_PING_KEY_DIGEST = (
    "35ce9f20549edbb68a8cacd4903ba6959bf5c066b3d597131d516f7428ab5357"
    "d9cd7d9cb3a3681df5a12010abccea57313ce060347e9d3adbf3b009fd64bf83"
)
NODE_PING_PASSWORD_DIGEST = (
    "a1406b3df40e9798199bcc6dd2a4c50a7551314be429d44a6076770f89570494"
    "3a02bf2eed1e7621da7a4143a6c8b3ac44ff3d863d6485948e2c07032a4d4528"
)
NODE_PONG_DIGEST = (
    "3a41785bdf56fb2a05ebc5f3b45bd47616e79bb9218283978f1044bd3cf452d4"
    "b0be40bbf74a84926cb88e36b857d19f038fc40130ad806c67717d971d9efbdc"
)


def sha512_hex(*parts: bytes) -> str:
    return hashlib.sha512(b"".join(parts)).hexdigest()


def creds(username: str = "", password: str = "") -> Credentials:
    return Credentials(
        self_hostname=CLIENT, shared_key=SHARED_KEY, username=username, password=password
    )


def helo(nonce: Any = NONCE, auth: Any = "", keepalive: Any = True) -> list[Any]:
    return ["HELO", {"nonce": nonce, "auth": auth, "keepalive": keepalive}]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")


def good_pong(hostname: str = SERVER, nonce: bytes = NONCE, salt: bytes = SALT) -> list[Any]:
    digest = sha512_hex(salt, hostname.encode(), nonce, SHARED_KEY.encode())
    return ["PONG", True, "", hostname, digest]


def state_of(hs: ClientHandshake) -> HandshakeState:
    """``hs.state``, without mypy narrowing it across calls."""
    return hs.state


def after_helo(credentials: Credentials | None = None) -> ClientHandshake:
    hs = ClientHandshake(credentials or creds(), salt=SALT)
    hs.receive_helo(helo())
    assert hs.state is HandshakeState.AWAITING_PONG
    return hs


# --- PING: golden vectors -----------------------------------------------------------------


def test_ping_matches_the_node_implementation_with_user_auth() -> None:
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    ping = unpack(hs.receive_helo(helo(auth=AUTH_SALT)))
    assert ping == [
        "PING",
        CLIENT,
        SALT.decode(),
        NODE_PING_KEY_DIGEST,
        "alice",
        NODE_PING_PASSWORD_DIGEST,
    ]
    # and the same digests by the formula, with hashlib
    assert ping[3] == sha512_hex(SALT, CLIENT.encode(), NONCE, SHARED_KEY.encode())
    assert ping[5] == sha512_hex(AUTH_SALT, b"alice", PASSWORD.encode())


def test_ping_without_user_auth_sends_empty_username_and_digest() -> None:
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    ping = unpack(hs.receive_helo(helo(auth="")))
    assert ping == ["PING", CLIENT, SALT.decode(), NODE_PING_KEY_DIGEST, "", ""]


def test_ping_with_auth_salt_but_no_username_answers_like_fluentd() -> None:
    # Fluentd's in_forward sends an auth salt whenever it has <security>, and its out_forward
    # then sends username "" and sha512_hex(auth_salt + "" + "").
    hs = ClientHandshake(creds(), salt=SALT)
    ping = unpack(hs.receive_helo(helo(auth=AUTH_SALT)))
    assert ping[4:] == ["", sha512_hex(AUTH_SALT)]


@pytest.mark.parametrize("auth", [None, "", b""], ids=["nil", "empty-str", "empty-bin"])
def test_empty_or_missing_auth_salt_means_no_user_auth(auth: Any) -> None:
    message = helo()
    if auth is None:
        del message[1]["auth"]
    else:
        message[1]["auth"] = auth
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    assert unpack(hs.receive_helo(message))[4:] == ["", ""]


def test_auth_salt_as_str_is_hashed_as_its_utf8_bytes() -> None:
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    ping = unpack(hs.receive_helo(helo(auth="sälz")))
    assert ping[5] == sha512_hex("sälz".encode(), b"alice", PASSWORD.encode())


def test_non_ascii_names_and_keys_are_hashed_as_utf8() -> None:
    credentials = Credentials(
        self_hostname="hôte", shared_key="clé", username="zoë", password="mot de passe"
    )
    ping = unpack(ClientHandshake(credentials, salt=SALT).receive_helo(helo(auth=AUTH_SALT)))
    assert ping[1] == "hôte"
    assert ping[3] == sha512_hex(SALT, "hôte".encode(), NONCE, "clé".encode())
    assert ping[5] == sha512_hex(AUTH_SALT, "zoë".encode(), b"mot de passe")


# --- nonce and salt: bin or str -----------------------------------------------------------


def test_nonce_as_bin_or_str_gives_the_same_ping() -> None:
    ascii_nonce = b"nonce-0123456789"
    as_bin = ClientHandshake(creds(), salt=SALT).receive_helo(helo(nonce=ascii_nonce))
    as_str = ClientHandshake(creds(), salt=SALT).receive_helo(helo(nonce=ascii_nonce.decode()))
    assert as_bin == as_str
    assert unpack(as_bin)[3] == sha512_hex(SALT, CLIENT.encode(), ascii_nonce, SHARED_KEY.encode())


def test_nonce_as_non_utf8_str_like_fluent_bit_is_hashed_as_raw_bytes() -> None:
    # Fluent Bit packs 16 random bytes as a msgpack *str*. Decoded with surrogateescape, the
    # handshake recovers the exact bytes.
    raw = bytes([0xFF, 0xFE, 0x80, 0x00]) * 4
    wire = b"\x92\xa4HELO\x81\xa5nonce\xb0" + raw  # ["HELO", {"nonce": str(raw)}]
    hs = ClientHandshake(creds(), salt=SALT)
    ping = unpack(hs.receive_helo(unpack(wire)))
    assert ping[3] == sha512_hex(SALT, CLIENT.encode(), raw, SHARED_KEY.encode())
    hs.receive_pong(good_pong(nonce=raw))
    assert hs.state is HandshakeState.DONE


def test_default_salt_is_fresh_32_hex_digits_sent_as_str() -> None:
    first, second = ClientHandshake(creds()), ClientHandshake(creds())
    assert first.salt != second.salt
    assert len(first.salt) == 32
    int(first.salt, 16)  # hex digits only
    ping = first.receive_helo(helo())
    assert b"\xd9\x20" + first.salt in ping  # a str8 of 32 bytes, not a bin (0xc4)
    assert msgpack.unpackb(ping, raw=False)[2] == first.salt.decode()


def test_a_given_non_utf8_salt_still_goes_out_as_str_with_its_exact_bytes() -> None:
    salt = b"\xff\x00salt\x80"
    ping = ClientHandshake(creds(), salt=salt).receive_helo(helo())
    # str8 header (0xd9) or fixstr (0xa0-0xbf), never bin (0xc4)
    assert b"\xc4" + bytes([len(salt)]) + salt not in ping
    assert bytes([0xA0 | len(salt)]) + salt in ping
    assert unpack(ping)[3] == sha512_hex(salt, CLIENT.encode(), NONCE, SHARED_KEY.encode())


@pytest.mark.parametrize("salt", [b"", "text"], ids=["empty", "str"])
def test_bad_salt_is_refused(salt: Any) -> None:
    with pytest.raises(ValueError, match="salt"):
        ClientHandshake(creds(), salt=salt)


# --- HELO checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"nonce": NONCE}, "a map"),
        ([], "empty array"),
        (["HELO"], "array of 1"),
        (["HELO", {"nonce": NONCE}, {}], "array of 3"),
        (["PONG", {"nonce": NONCE}], "'PONG'"),
        ([b"HELO", {"nonce": NONCE}], "a bin"),
        (["HELO", None], "options are nil"),
        (["HELO", ["nonce", NONCE]], "options are an array"),
        (["HELO", {"auth": ""}], "no nonce"),
        (helo(nonce=12), "nonce is an integer"),
        (helo(nonce=None), "nonce is nil"),
        (helo(auth=7), "auth salt is an integer"),
        (helo(keepalive="yes"), "keepalive is a str"),
        (helo(keepalive=1), "keepalive is an integer"),
    ],
)
def test_malformed_helo_is_the_servers_fault(message: Any, words: str) -> None:
    hs = ClientHandshake(creds(), salt=SALT)
    with pytest.raises(HandshakeProtocolError, match=r"HELO|malformed") as info:
        hs.receive_helo(message)
    assert words in str(info.value)
    assert hs.state is HandshakeState.FAILED


def test_keepalive_from_helo() -> None:
    hs = ClientHandshake(creds(), salt=SALT)
    assert hs.keepalive is None
    hs.receive_helo(helo(keepalive=False))
    assert hs.keepalive is False
    missing = ClientHandshake(creds(), salt=SALT)
    missing.receive_helo(["HELO", {"nonce": NONCE}])
    assert missing.keepalive is True


def test_helo_as_tuple_is_accepted() -> None:
    hs = ClientHandshake(creds(), salt=SALT)
    hs.receive_helo(("HELO", {"nonce": NONCE}))
    assert hs.state is HandshakeState.AWAITING_PONG


# --- PONG checks, each failing on its own -------------------------------------------------


def test_good_pong_completes_the_handshake() -> None:
    hs = after_helo()
    hs.receive_pong(good_pong())
    assert hs.state is HandshakeState.DONE
    assert hs.server_hostname == SERVER


def test_pong_matches_the_node_implementation() -> None:
    assert good_pong()[4] == NODE_PONG_DIGEST
    hs = after_helo()
    hs.receive_pong(["PONG", True, "", SERVER, NODE_PONG_DIGEST])
    assert hs.state is HandshakeState.DONE


def test_pong_fields_as_bin_are_accepted() -> None:
    pong = good_pong()
    hs = after_helo()
    hs.receive_pong(["PONG", True, b"", SERVER.encode(), pong[4].encode()])
    assert hs.state is HandshakeState.DONE


def _with(index: int, value: Any) -> list[Any]:
    pong = good_pong()
    pong[index] = value
    return pong


@pytest.mark.parametrize(
    ("pong", "words"),
    [
        ({"PONG": True}, "got a map"),
        (None, "got nil"),
        (good_pong()[:4], "array of 4"),
        ([*good_pong(), "extra"], "array of 6"),
        (_with(0, "PING"), "'PING'"),
        (_with(0, b"PONG"), "a bin"),
        (_with(1, "true"), "auth result is a str"),
        (_with(1, 1), "auth result is an integer"),
        (_with(1, None), "auth result is nil"),
        (_with(3, CLIENT), "same as ours"),
        (_with(3, CLIENT.encode()), "same as ours"),
        (_with(3, 42), "hostname is an integer"),
        (_with(4, None), "digest is nil"),
        (_with(4, good_pong()[4].upper()), "shared key mismatch"),
        (_with(4, good_pong()[4][:-1]), "shared key mismatch"),
        (_with(4, ""), "shared key mismatch"),
        # a digest made right but for another name than the one in the PONG
        (_with(3, "other.example"), "shared key mismatch"),
        (_with(4, good_pong(nonce=b"another nonce")[4]), "shared key mismatch"),
        (_with(4, good_pong(salt=b"another salt")[4]), "shared key mismatch"),
        (
            _with(4, sha512_hex(SALT, SERVER.encode(), NONCE, b"wrong key")),
            "shared key mismatch",
        ),
    ],
)
def test_bad_pong_is_the_servers_fault(pong: Any, words: str) -> None:
    hs = after_helo()
    with pytest.raises(HandshakeProtocolError) as info:
        hs.receive_pong(pong)
    assert words in str(info.value)
    assert not isinstance(info.value, AuthRefusedError)
    assert hs.state is HandshakeState.FAILED
    assert hs.server_hostname is None


def test_refusal_carries_the_servers_reason() -> None:
    hs = after_helo()
    with pytest.raises(AuthRefusedError) as info:
        hs.receive_pong(["PONG", False, "username/password mismatch", "", ""])
    assert info.value.reason == "username/password mismatch"
    assert str(info.value) == "the server refused the handshake: username/password mismatch"
    assert isinstance(info.value, HandshakeError)
    assert hs.state is HandshakeState.FAILED


def test_refusal_is_reported_before_the_hostname_and_digest_are_looked_at() -> None:
    # Fluentd's order: a refusal's PONG has empty hostname and digest fields.
    hs = after_helo()
    with pytest.raises(AuthRefusedError):
        hs.receive_pong(["PONG", False, "shared_key mismatch", CLIENT, None])


def test_refusal_reason_is_made_safe_for_one_log_line() -> None:
    reason = "bad\nline\x1b[31m" + "x" * 500
    hs = after_helo()
    with pytest.raises(AuthRefusedError) as info:
        hs.receive_pong(["PONG", False, reason, "", ""])
    assert info.value.reason == reason
    message = str(info.value)
    assert "\n" not in message
    assert "\x1b" not in message
    assert len(message) < 300


@pytest.mark.parametrize(
    ("reason", "shown"),
    [(b"bin reason", "bin reason"), (None, "(no reason given)"), ("", "(no reason given)")],
)
def test_refusal_reason_of_other_types(reason: Any, shown: str) -> None:
    hs = after_helo()
    with pytest.raises(AuthRefusedError) as info:
        hs.receive_pong(["PONG", False, reason, "", ""])
    assert str(info.value).endswith(shown)


# --- states -------------------------------------------------------------------------------


def test_pong_before_helo_is_our_bug_and_changes_nothing() -> None:
    hs = ClientHandshake(creds(), salt=SALT)
    with pytest.raises(HandshakeUsageError, match=r"receive_pong.*AWAITING_HELO"):
        hs.receive_pong(good_pong())
    assert hs.state is HandshakeState.AWAITING_HELO
    hs.receive_helo(helo())  # still usable
    hs.receive_pong(good_pong())
    assert state_of(hs) is HandshakeState.DONE


def test_second_helo_is_our_bug() -> None:
    hs = after_helo()
    with pytest.raises(HandshakeUsageError, match=r"receive_helo.*AWAITING_PONG"):
        hs.receive_helo(helo())
    assert hs.state is HandshakeState.AWAITING_PONG


@pytest.mark.parametrize("method", ["receive_helo", "receive_pong"])
def test_nothing_is_accepted_after_done(method: str) -> None:
    hs = after_helo()
    hs.receive_pong(good_pong())
    with pytest.raises(HandshakeUsageError, match="DONE"):
        getattr(hs, method)(helo() if method == "receive_helo" else good_pong())
    assert hs.state is HandshakeState.DONE


@pytest.mark.parametrize("method", ["receive_helo", "receive_pong"])
def test_nothing_is_accepted_after_failure(method: str) -> None:
    hs = ClientHandshake(creds(), salt=SALT)
    with pytest.raises(HandshakeProtocolError):
        hs.receive_helo(["nonsense"])
    with pytest.raises(HandshakeUsageError, match="FAILED"):
        getattr(hs, method)(helo() if method == "receive_helo" else good_pong())
    assert hs.state is HandshakeState.FAILED


def test_repr_shows_the_state() -> None:
    hs = ClientHandshake(creds(), salt=SALT)
    assert repr(hs) == f"<ClientHandshake AWAITING_HELO self_hostname={CLIENT!r}>"


# --- secrets ------------------------------------------------------------------------------


def _secret_texts() -> list[str]:
    key_digest = sha512_hex(SALT, CLIENT.encode(), NONCE, SHARED_KEY.encode())
    pong_digest = good_pong()[4]
    password_digest = sha512_hex(AUTH_SALT, b"alice", PASSWORD.encode())
    return [SHARED_KEY, PASSWORD, key_digest, pong_digest, password_digest]


def _assert_no_secret(text: str) -> None:
    for secret in _secret_texts():
        assert secret not in text
        assert secret.upper() not in text


def test_credentials_repr_hides_the_secrets() -> None:
    credentials = creds("alice", PASSWORD)
    for text in (repr(credentials), str(credentials), f"{credentials}", repr([credentials])):
        _assert_no_secret(text)
        assert "alice" in text
        assert CLIENT in text
        assert "<hidden>" in text


def test_handshake_repr_hides_the_secrets() -> None:
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    hs.receive_helo(helo(auth=AUTH_SALT))
    _assert_no_secret(repr(hs))


@pytest.mark.parametrize(
    "pong",
    [
        _with(4, sha512_hex(SALT, SERVER.encode(), NONCE, b"wrong key")),
        _with(4, good_pong()[4].upper()),
        _with(3, CLIENT),
        _with(1, "true"),
        ["PONG", True, "", SERVER, good_pong()[4], "extra"],
        [good_pong()[4], True, "", SERVER, good_pong()[4]],
        ["PONG", False, "refused", SERVER, good_pong()[4]],
    ],
)
def test_errors_never_show_secrets_or_digests(pong: Any) -> None:
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    hs.receive_helo(helo(auth=AUTH_SALT))
    with pytest.raises(HandshakeError) as info:
        hs.receive_pong(pong)
    exc = info.value
    for text in (str(exc), repr(exc), repr(exc.args), repr(vars(exc))):
        _assert_no_secret(text)


def test_helo_errors_never_show_what_the_server_sent() -> None:
    digest = _secret_texts()[2]
    hs = ClientHandshake(creds("alice", PASSWORD), salt=SALT)
    with pytest.raises(HandshakeProtocolError) as info:
        hs.receive_helo([digest, {"nonce": NONCE}])
    assert digest[:8] not in str(info.value)
    assert "starting with a str" in str(info.value)


# --- the server's side --------------------------------------------------------------------


def test_make_helo_is_fluentds_shape() -> None:
    assert unpack(make_helo(NONCE, AUTH_SALT)) == [
        "HELO",
        {"nonce": NONCE, "auth": AUTH_SALT, "keepalive": True},
    ]
    assert unpack(make_helo(NONCE, b"", keepalive=False)) == [
        "HELO",
        {"nonce": NONCE, "auth": "", "keepalive": False},
    ]
    assert b"\xc4\x10" + NONCE in make_helo(NONCE, b"")  # the nonce is a bin


def _ping(credentials: Credentials, auth_salt: bytes = b"") -> Any:
    hs = ClientHandshake(credentials, salt=SALT)
    return unpack(hs.receive_helo(unpack(make_helo(NONCE, auth_salt))))


def test_check_ping_accepts_a_good_ping() -> None:
    result = check_ping(_ping(creds()), NONCE, b"", SHARED_KEY, {})
    assert result == PingCheck(True, "", SALT, CLIENT)
    ok, reason, salt, hostname = result  # unpacks as a 4-tuple
    assert (ok, reason, salt, hostname) == (True, "", SALT, CLIENT)


def test_check_ping_refuses_a_wrong_shared_key() -> None:
    other = Credentials(self_hostname=CLIENT, shared_key="not the key")
    result = check_ping(_ping(other), NONCE, b"", SHARED_KEY, {})
    assert result == PingCheck(False, "shared_key mismatch", SALT, CLIENT)


def test_check_ping_refuses_another_nonce() -> None:
    result = check_ping(_ping(creds()), b"another nonce", b"", SHARED_KEY, {})
    assert result.reason == "shared_key mismatch"


@pytest.mark.parametrize(
    ("username", "password", "ok"),
    [
        ("alice", PASSWORD, True),
        ("alice", "wrong", False),
        ("mallory", PASSWORD, False),
        ("", "", False),
    ],
)
def test_check_ping_user_auth(username: str, password: str, ok: bool) -> None:
    ping = _ping(creds(username, password), AUTH_SALT)
    result = check_ping(ping, NONCE, AUTH_SALT, SHARED_KEY, {"alice": PASSWORD, "bob": "x"})
    assert result.ok is ok
    assert result.reason == ("" if ok else "username/password mismatch")
    assert result.shared_key_salt == SALT


def test_check_ping_ignores_users_when_user_auth_is_off() -> None:
    ping = _ping(creds("alice", "wrong"), AUTH_SALT)
    assert check_ping(ping, NONCE, AUTH_SALT, SHARED_KEY, {}).ok


def test_check_ping_accepts_a_bin_salt() -> None:
    ping = _ping(creds())
    ping[2] = SALT  # as bytes
    assert check_ping(ping, NONCE, b"", SHARED_KEY, {}).ok


@pytest.mark.parametrize(
    "ping",
    [
        None,
        ["PING", CLIENT, SALT, "digest", ""],
        ["PONG", CLIENT, SALT, "digest", "", ""],
        ["PING", 7, SALT, "digest", "", ""],
        ["PING", CLIENT, None, "digest", "", ""],
        ["PING", CLIENT, SALT, "digest", "", 0],
    ],
)
def test_check_ping_refuses_a_malformed_ping(ping: Any) -> None:
    assert check_ping(ping, NONCE, b"", SHARED_KEY, {}) == PingCheck(
        False, "invalid ping message", b"", ""
    )


def test_make_pong_is_fluentds_shape() -> None:
    assert unpack(make_pong(True, "", SERVER, SALT, NONCE, SHARED_KEY)) == [
        "PONG",
        True,
        "",
        SERVER,
        NODE_PONG_DIGEST,
    ]
    refused = make_pong(False, "shared_key mismatch", SERVER, SALT, NONCE, SHARED_KEY)
    assert unpack(refused) == ["PONG", False, "shared_key mismatch", "", ""]


@pytest.mark.parametrize(
    ("client", "users", "expected"),
    [
        (creds(), {}, None),
        (creds("alice", PASSWORD), {"alice": PASSWORD}, None),
        (creds("alice", "nope"), {"alice": PASSWORD}, "username/password mismatch"),
        (Credentials(CLIENT, "wrong key"), {}, "shared_key mismatch"),
    ],
)
def test_round_trip_through_the_server_helpers(
    client: Credentials, users: dict[str, str], expected: str | None
) -> None:
    auth_salt = AUTH_SALT if users else b""
    hs = ClientHandshake(client)
    ping = hs.receive_helo(unpack(make_helo(NONCE, auth_salt)))
    ok, reason, salt, hostname = check_ping(unpack(ping), NONCE, auth_salt, SHARED_KEY, users)
    assert hostname == CLIENT
    pong = unpack(make_pong(ok, reason, SERVER, salt, NONCE, SHARED_KEY))
    if expected is None:
        hs.receive_pong(pong)
        assert hs.state is HandshakeState.DONE
        assert hs.server_hostname == SERVER
    else:
        with pytest.raises(AuthRefusedError) as info:
            hs.receive_pong(pong)
        assert info.value.reason == expected


def test_check_ping_refuses_a_client_with_the_servers_own_hostname() -> None:
    ping = _ping(Credentials(SERVER, SHARED_KEY))
    result = check_ping(ping, NONCE, b"", SHARED_KEY, {}, server_hostname=SERVER)
    assert result == PingCheck(
        False, "same hostname between input and output: invalid configuration", SALT, SERVER
    )
    assert check_ping(ping, NONCE, b"", SHARED_KEY, {}).ok  # no server_hostname: not checked
