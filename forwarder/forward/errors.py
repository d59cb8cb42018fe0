"""The Forward output's delivery errors, by the kind of failure they are.

A failure marks the server down for a backoff delay; what happens next depends on its kind:

==============  ==========================================  ====================================
kind            examples                                    back when
==============  ==========================================  ====================================
UNREACHABLE     connection refused, connect timeout          a heartbeat TCP connect succeeds,
                                                             or the backoff ends
REFUSED         untrusted certificate, handshake refused,    the backoff ends (a TCP connect
                bad PONG digest, HELO/shared_key mismatch    says nothing new: no heartbeat)
BROKEN          connection lost, no ack in time, garbage     the backoff ends
==============  ==========================================  ====================================
"""

from __future__ import annotations

import enum
from typing import ClassVar


class FailureKind(enum.Enum):
    """What a failure says about the server, which decides how it is tried again."""

    UNREACHABLE = "unreachable"
    """No TCP connection: a heartbeat TCP connect tells when it is back."""
    REFUSED = "refused"
    """It answers but won't take us (TLS, handshake): usually a configuration problem."""
    BROKEN = "broken"
    """It broke while delivering: connection lost, no ack in time, garbage."""


class DeliveryError(Exception):
    """A chunk could not be delivered over this connection; it will be sent again.

    Messages never hold a secret: the handshake's errors are built without them."""

    kind: ClassVar[FailureKind] = FailureKind.BROKEN
    reason: ClassVar[str] = "other"
    """Its label in forwarder_server_failures_total."""


class ConnectError(DeliveryError):
    """No TCP connection: refused, unreachable, timed out."""

    kind = FailureKind.UNREACHABLE
    reason = "connect"


class TLSHandshakeError(DeliveryError):
    """The TLS handshake failed: an untrusted certificate, a wrong name, no common version."""

    kind = FailureKind.REFUSED
    reason = "tls_handshake"


class AuthError(DeliveryError):
    """The Forward handshake failed: refused credentials, a server we can't trust, or a
    server and a configuration that disagree about whether there is a handshake at all."""

    kind = FailureKind.REFUSED
    reason = "handshake"


class ConnectionLostError(DeliveryError):
    """The server closed or reset the connection."""

    reason = "connection_lost"


class AckTimeoutError(DeliveryError):
    """No ack within ack_timeout."""

    reason = "ack_timeout"


class ServerProtocolError(DeliveryError):
    """The server sent something that isn't the Forward protocol."""

    reason = "protocol"
