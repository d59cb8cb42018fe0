"""The Forward protocol v1 handshake (HELO, PING, PONG), sans-I/O.

Wire shapes (msgpack arrays; ``sha512_hex`` is the lowercase hex SHA-512 of the
concatenated bytes)::

    server -> client  ["HELO", {"nonce": bin|str, "auth": bin|str, "keepalive": bool}]
    client -> server  ["PING", self_hostname, shared_key_salt,
                       sha512_hex(shared_key_salt + self_hostname + nonce + shared_key),
                       username, sha512_hex(auth_salt + username + password)]
    server -> client  ["PONG", auth_ok, reason, server_hostname,
                       sha512_hex(shared_key_salt + server_hostname + nonce + shared_key)]

``auth`` is the user-auth salt. Fluentd's in_forward sends a non-empty one whenever it has a
``<security>`` section, even with ``user_auth false``; the client then answers with its
username (maybe ``""``) and the password digest, and the server ignores them unless it checks
users. When ``auth`` is empty the client sends ``""`` for both, as Fluentd's out_forward does.

The nonce and the salts are opaque bytes that arrive as msgpack bin or str. Fluent Bit packs
16 random bytes as a *str*, which is not valid UTF-8, so decode server messages with
``msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")``: a str is then turned back
into its exact bytes here with ``encode("utf-8", "surrogateescape")``. Our own salt goes out
as a str of 32 hex digits, as Fluentd's out_forward sends it (Fluent Bit's in_forward refuses
a bin salt).

:class:`ClientHandshake` is the client's state machine, h11-style: it takes decoded
messages and returns the bytes to send; :class:`~forwarder.forward.protocol.ClientConnection`
drives it. ``make_helo``, ``check_ping`` and ``make_pong`` are the server's side, the one
implementation the test receivers (``tests/harness/receivers.py``) answer with.

Secrets (the shared key, the password) and the digests derived from them never appear in an
exception message or a ``repr``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

__all__ = [
    "AuthRefusedError",
    "ClientHandshake",
    "Credentials",
    "HandshakeError",
    "HandshakeProtocolError",
    "HandshakeState",
    "HandshakeUsageError",
    "PingCheck",
    "check_ping",
    "make_helo",
    "make_pong",
]

# How much of a server's text (a refusal reason, a hostname) goes into an error message.
_SHOWN_CHARS = 200
# A message's first item is shown only this short: enough for "HELO", "PONG", "PING".
_SHOWN_HEAD_CHARS = 8


# --- errors -------------------------------------------------------------------------------


class HandshakeError(Exception):
    """Base of the handshake's errors."""


class AuthRefusedError(HandshakeError):
    """The server checked our PING and said no; ``reason`` is the server's own text.

    This is the server's verdict on our credentials (a wrong shared key, an unknown user, an
    anonymous source it refuses): retrying with the same configuration gets the same answer.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        shown = _printable(reason) if reason else "(no reason given)"
        super().__init__(f"the server refused the handshake: {shown}")


class HandshakeProtocolError(HandshakeError):
    """The server's HELO or PONG can't be accepted: malformed, a wrong digest, our own name.

    The peer misbehaved (or is not the server we meant): drop the connection.
    """


class HandshakeUsageError(HandshakeError):
    """We called the handshake in the wrong state: a bug on our side."""


# --- credentials --------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Credentials:
    """What the client proves itself with. ``username == ""`` means no user auth."""

    self_hostname: str
    shared_key: str
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:
        return (
            f"Credentials(self_hostname={self.self_hostname!r}, username={self.username!r}, "
            "shared_key=<hidden>, password=<hidden>)"
        )


# --- the client ---------------------------------------------------------------------------


class HandshakeState(enum.Enum):
    AWAITING_HELO = "AWAITING_HELO"
    AWAITING_PONG = "AWAITING_PONG"
    DONE = "DONE"
    FAILED = "FAILED"


class _Event(enum.Enum):
    HELO = "receive_helo"
    PONG = "receive_pong"


# The whole state machine. A call that is not in this table raises HandshakeUsageError; a
# call whose message fails a check moves to FAILED instead.
_TRANSITIONS: dict[tuple[HandshakeState, _Event], HandshakeState] = {
    (HandshakeState.AWAITING_HELO, _Event.HELO): HandshakeState.AWAITING_PONG,
    (HandshakeState.AWAITING_PONG, _Event.PONG): HandshakeState.DONE,
}


class ClientHandshake:
    """The client's side of the handshake: HELO in, PING out, PONG in. ::

    hs = ClientHandshake(Credentials("collector-1", shared_key))
    send(hs.receive_helo(helo))   # the decoded HELO in, the packed PING out
    hs.receive_pong(pong)         # raises unless the server checks out
    assert hs.state is HandshakeState.DONE
    """

    def __init__(self, credentials: Credentials, salt: bytes | None = None) -> None:
        if salt is None:
            # 128 random bits as 32 hex digits, like Fluentd's out_forward.
            salt = os.urandom(16).hex().encode("ascii")
        elif not isinstance(salt, bytes) or not salt:
            raise ValueError("salt must be non-empty bytes")
        self._credentials = credentials
        self._salt = salt
        self._nonce = b""
        self.state = HandshakeState.AWAITING_HELO
        self.keepalive: bool | None = None
        """From the HELO: whether the server keeps the connection open (None before)."""
        self.server_hostname: str | None = None
        """From an accepted PONG: the server's self_hostname (None before)."""

    def __repr__(self) -> str:
        return (
            f"<ClientHandshake {self.state.value} "
            f"self_hostname={self._credentials.self_hostname!r}>"
        )

    @property
    def salt(self) -> bytes:
        """Our shared-key salt, as sent in the PING."""
        return self._salt

    def receive_helo(self, message: object) -> bytes:
        """Check the server's decoded HELO; return the packed PING to send."""
        self._start(_Event.HELO)
        try:
            nonce, auth_salt, keepalive = _parse_helo(message)
            ping = self._ping(nonce, auth_salt)
        except BaseException:
            self.state = HandshakeState.FAILED
            raise
        self._nonce = nonce
        self.keepalive = keepalive
        self.state = _TRANSITIONS[(HandshakeState.AWAITING_HELO, _Event.HELO)]
        return ping

    def receive_pong(self, message: object) -> None:
        """Check the server's decoded PONG; return only if the handshake succeeded.

        The checks are Fluentd out_forward's, in its order: the shape, the server's verdict,
        a hostname different from ours, and the server's proof that it knows the shared key.
        """
        self._start(_Event.PONG)
        try:
            self.server_hostname = self._check_pong(message)
        except BaseException:
            self.state = HandshakeState.FAILED
            raise
        self.state = _TRANSITIONS[(HandshakeState.AWAITING_PONG, _Event.PONG)]

    def _start(self, event: _Event) -> None:
        if (self.state, event) not in _TRANSITIONS:
            raise HandshakeUsageError(f"{event.value}() called in state {self.state.value}")

    def _ping(self, nonce: bytes, auth_salt: bytes) -> bytes:
        creds = self._credentials
        hostname = creds.self_hostname.encode("utf-8")
        key_digest = _sha512_hex(self._salt, hostname, nonce, creds.shared_key.encode("utf-8"))
        if auth_salt:
            username = creds.username
            password_digest = _sha512_hex(
                auth_salt, username.encode("utf-8"), creds.password.encode("utf-8")
            )
        else:
            username, password_digest = "", ""
        ping = [
            "PING",
            creds.self_hostname,
            self._salt.decode("utf-8", "surrogateescape"),
            key_digest,
            username,
            password_digest,
        ]
        return _pack(ping)

    def _check_pong(self, message: object) -> str:
        if not isinstance(message, list | tuple) or len(message) != 5 or message[0] != "PONG":
            raise HandshakeProtocolError(
                f'expected a PONG ["PONG", ok, reason, hostname, digest], got {_shape(message)}'
            )
        _, auth_ok, reason, hostname, digest = message
        if not isinstance(auth_ok, bool):
            raise HandshakeProtocolError(
                f"malformed PONG: the auth result is {_kind(auth_ok)}, not a boolean"
            )
        if not auth_ok:
            raise AuthRefusedError(_text(reason))
        hostname_bytes = _opaque(hostname, "PONG server hostname")
        if hostname_bytes == self._credentials.self_hostname.encode("utf-8"):
            raise HandshakeProtocolError(
                "the server's self_hostname is the same as ours "
                f"({_printable(self._credentials.self_hostname)}): invalid configuration, "
                "give each end its own self_hostname"
            )
        expected = _sha512_hex(
            self._salt,
            hostname_bytes,
            self._nonce,
            self._credentials.shared_key.encode("utf-8"),
        ).encode("ascii")
        if not hmac.compare_digest(_opaque(digest, "PONG digest"), expected):
            raise HandshakeProtocolError(
                "shared key mismatch: the server's PONG digest is not the one our shared key "
                "gives (the server does not know the shared key, or is not the server meant)"
            )
        return hostname_bytes.decode("utf-8", "replace")


def _parse_helo(message: object) -> tuple[bytes, bytes, bool]:
    if not isinstance(message, list | tuple) or len(message) != 2 or message[0] != "HELO":
        raise HandshakeProtocolError(
            f'expected a HELO ["HELO", {{options}}], got {_shape(message)}'
        )
    options = message[1]
    if not isinstance(options, dict):
        raise HandshakeProtocolError(f"malformed HELO: the options are {_kind(options)}, not a map")
    if "nonce" not in options:
        raise HandshakeProtocolError("malformed HELO: no nonce")
    nonce = _opaque(options["nonce"], "HELO nonce")
    auth = options.get("auth")
    auth_salt = b"" if auth is None else _opaque(auth, "HELO auth salt")
    keepalive = options.get("keepalive", True)
    if not isinstance(keepalive, bool):
        raise HandshakeProtocolError(
            f"malformed HELO: keepalive is {_kind(keepalive)}, not a boolean"
        )
    return nonce, auth_salt, keepalive


# --- the server's side (the test receivers use it) ----------------------------------------

_SAME_HOSTNAME = "same hostname between input and output: invalid configuration"


class PingCheck(NamedTuple):
    """The server's verdict on a PING; ``reason`` is empty when ``ok``."""

    ok: bool
    reason: str
    shared_key_salt: bytes
    client_hostname: str


def make_helo(nonce: bytes, auth_salt: bytes, keepalive: bool = True) -> bytes:
    """The server's packed HELO, as Fluentd's in_forward sends it (``auth`` "" when empty)."""
    options: dict[str, Any] = {
        "nonce": nonce,
        "auth": auth_salt if auth_salt else "",
        "keepalive": keepalive,
    }
    return _pack(["HELO", options])


def check_ping(
    message: object,
    nonce: bytes,
    auth_salt: bytes,
    shared_key: str,
    users: Mapping[str, str],
    *,
    server_hostname: str | None = None,
) -> PingCheck:
    """Check a decoded PING as Fluentd's in_forward does; ``users`` empty: no user auth.
    With ``server_hostname``, a client that gives the same name is refused, as Fluentd does.

    The reasons are Fluentd's words: "invalid ping message", "same hostname between input
    and output: invalid configuration", "shared_key mismatch", "username/password mismatch".
    """
    invalid = PingCheck(False, "invalid ping message", b"", "")
    if not isinstance(message, list | tuple) or len(message) != 6 or message[0] != "PING":
        return invalid
    _, hostname, salt, key_digest, username, password_digest = message
    try:
        salt_bytes = _opaque(salt, "PING salt")
        hostname_bytes = _opaque(hostname, "PING hostname")
        key_digest_bytes = _opaque(key_digest, "PING digest")
        username_bytes = _opaque(username, "PING username")
        password_digest_bytes = _opaque(password_digest, "PING password digest")
    except HandshakeProtocolError:
        return invalid
    client_hostname = hostname_bytes.decode("utf-8", "replace")
    if server_hostname is not None and hostname_bytes == server_hostname.encode("utf-8"):
        return PingCheck(False, _SAME_HOSTNAME, salt_bytes, client_hostname)
    expected = _sha512_hex(salt_bytes, hostname_bytes, nonce, shared_key.encode("utf-8"))
    if not hmac.compare_digest(key_digest_bytes, expected.encode("ascii")):
        return PingCheck(False, "shared_key mismatch", salt_bytes, client_hostname)
    if users:
        password = users.get(username_bytes.decode("utf-8", "surrogateescape"))
        expected_password = (
            None
            if password is None
            else _sha512_hex(auth_salt, username_bytes, password.encode("utf-8"))
        )
        if expected_password is None or not hmac.compare_digest(
            password_digest_bytes, expected_password.encode("ascii")
        ):
            return PingCheck(False, "username/password mismatch", salt_bytes, client_hostname)
    return PingCheck(True, "", salt_bytes, client_hostname)


def make_pong(
    ok: bool,
    reason: str,
    server_hostname: str,
    shared_key_salt: bytes,
    nonce: bytes,
    shared_key: str,
) -> bytes:
    """The server's packed PONG, as Fluentd's in_forward sends it.

    A refusal carries the reason and empty hostname and digest fields.
    """
    if not ok:
        return _pack(["PONG", False, reason, "", ""])
    digest = _sha512_hex(
        shared_key_salt,
        server_hostname.encode("utf-8"),
        nonce,
        shared_key.encode("utf-8"),
    )
    return _pack(["PONG", True, "", server_hostname, digest])


# --- helpers ------------------------------------------------------------------------------


def _sha512_hex(*parts: bytes) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _pack(message: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True, unicode_errors="surrogateescape")
    return packed


def _opaque(value: object, what: str) -> bytes:
    """A field that may come as msgpack bin or str, as bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise HandshakeProtocolError(f"malformed message: the {what} is {_kind(value)}, not bin or str")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else repr(value)


def _printable(text: str) -> str:
    """The server's text, made safe for one log line and cut short."""
    cleaned = "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in text)
    if len(cleaned) > _SHOWN_CHARS:
        cleaned = cleaned[:_SHOWN_CHARS] + "..."
    return cleaned


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a str",
        bytes: "a bin",
        list: "an array",
        tuple: "an array",
        dict: "a map",
    }.get(type(value), type(value).__name__)


def _shape(message: object) -> str:
    """What a message looks like, without its content (it may hold digests)."""
    if isinstance(message, list | tuple):
        if not message:
            return "an empty array"
        head = message[0]
        if isinstance(head, str) and len(head) <= _SHOWN_HEAD_CHARS:
            first = repr(_printable(head))
        else:
            first = _kind(head)
        return f"an array of {len(message)} items starting with {first}"
    return _kind(message)
