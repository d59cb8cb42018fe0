"""The client's TLS context against a real TLS server on 127.0.0.1, with a throwaway PKI."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from forwarder.config import ConfigError, TLSConfig
from forwarder.forward.tls import (
    TLSConfigError,
    client_context,
    describe_tls_error,
    server_hostname,
)
from tests.harness.certs import PKI, CertPair, make_pki, openssl_available
from tests.helpers import run

# Every exchange with the local server finishes well within this, or the test fails.
DEADLINE_S = 10.0
LOCALHOST = "127.0.0.1"
T = TypeVar("T")

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- a TLS server -------------------------------------------------------------------------


def server_context(
    cert: CertPair, client_ca: Path | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    if max_version is not None:
        context.maximum_version = max_version
    return context


@dataclass
class Server:
    port: int
    peer_certs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


@contextlib.asynccontextmanager
async def tls_server(cert: CertPair, **options: Any) -> AsyncIterator[Server]:
    """An asyncio TLS server that says b"hi\\n" to each client past the handshake."""
    server = Server(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        if peer:
            server.peer_certs.append(peer)
        writer.write(b"hi\n")
        with contextlib.suppress(OSError):
            await writer.drain()
            await reader.read()  # until the client closes
        writer.close()

    context = server_context(cert, **options)
    listener = await asyncio.start_server(handle, LOCALHOST, 0, ssl=context)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


@contextlib.contextmanager
def refusing_server(cert: CertPair, **options: Any) -> Iterator[Server]:
    """A blocking TLS server in a thread, for one client, for handshakes it refuses.

    asyncio's own server aborts the connection when a handshake fails, so the client sees a
    reset and never the TLS alert that says why; Fluentd, Fluent Bit and this server send it.
    """
    context = server_context(cert, **options)
    listener = socket.create_server((LOCALHOST, 0))
    listener.settimeout(DEADLINE_S)
    server = Server(port=listener.getsockname()[1])

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(DEADLINE_S)
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hi\n")
                    tls.recv(1)
        except OSError as exc:  # ssl.SSLError included
            server.errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        thread.join(DEADLINE_S)
        listener.close()
        assert not thread.is_alive(), "the test server did not finish in time"


@contextlib.asynccontextmanager
async def plain_server(reply: bytes) -> AsyncIterator[int]:
    """A TCP server that answers anything with ``reply``: not TLS."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(reply)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, LOCALHOST, 0)
    async with listener:
        yield listener.sockets[0].getsockname()[1]


async def exchange(context: ssl.SSLContext, port: int, hostname: str | None) -> tuple[bytes, str]:
    """Connect, read the greeting; return it and the TLS version used."""
    reader, writer = await asyncio.open_connection(
        LOCALHOST, port, ssl=context, server_hostname=hostname, ssl_handshake_timeout=DEADLINE_S
    )
    try:
        greeting = await reader.readline()
        if not greeting:
            raise ConnectionResetError("the server closed the connection")
        version = writer.get_extra_info("ssl_object").version()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return greeting, str(version)


def connect(cfg: TLSConfig, cert: CertPair, **server: Any) -> tuple[bytes, str]:
    async def go() -> tuple[bytes, str]:
        async with tls_server(cert, **server) as srv:
            return await exchange(client_context(cfg), srv.port, server_hostname(cfg, LOCALHOST))

    return run(go())


def failure(cfg: TLSConfig, cert: CertPair, **server: Any) -> BaseException:
    """What the client gets from a server whose certificate it refuses."""
    with pytest.raises((ssl.SSLError, ConnectionError)) as info:
        connect(cfg, cert, **server)
    return info.value


def refused(cfg: TLSConfig, cert: CertPair, **options: Any) -> tuple[BaseException, str]:
    """What the client gets from a server that refuses it, and the server's reason."""
    with (
        refusing_server(cert, **options) as srv,
        pytest.raises((ssl.SSLError, ConnectionError)) as info,
    ):
        run(exchange(client_context(cfg), srv.port, server_hostname(cfg, LOCALHOST)))
    assert len(srv.errors) == 1
    return info.value, str(srv.errors[0])


# --- verification -------------------------------------------------------------------------


def test_server_signed_by_ca_file_is_verified(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert)
    assert connect(cfg, pki.server)[0] == b"hi\n"


def test_server_name_overrides_the_url_host(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, server_name="localhost")
    assert connect(cfg, pki.server)[0] == b"hi\n"


def test_the_name_is_checked(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, server_name="elsewhere.example")
    exc = failure(cfg, pki.server)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    message = describe_tls_error(exc)
    assert message.startswith("certificate verify failed: hostname mismatch")
    assert "elsewhere.example" in message
    assert "tls.server_name" in message


def test_a_certificate_from_another_ca_is_refused_readably(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert)
    exc = failure(cfg, pki.other_server)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert describe_tls_error(exc) == (
        "certificate verify failed: unable to get local issuer certificate "
        "(the server's certificate is not signed by a trusted CA)"
    )


def test_the_other_ca_trusts_its_own_server(pki: PKI) -> None:
    # control for the test above: the refusal is about the CA, not the certificate
    cfg = TLSConfig(ca_file=pki.other_ca.cert)
    assert connect(cfg, pki.other_server)[0] == b"hi\n"


def test_default_is_the_system_store_which_does_not_know_our_test_ca(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[object] = []
    original = ssl.SSLContext.load_default_certs

    def spy(self: ssl.SSLContext, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        loaded.append(purpose)
        original(self, purpose)

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", spy)
    cfg = TLSConfig()
    context = client_context(cfg)
    assert loaded == [ssl.Purpose.SERVER_AUTH]
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    exc = failure(cfg, pki.server)
    assert isinstance(exc, ssl.SSLCertVerificationError)


def test_ca_file_replaces_the_system_store(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[object] = []
    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", lambda *a: loaded.append(a))
    client_context(TLSConfig(ca_file=pki.ca.cert))
    assert loaded == []


def test_verify_false_accepts_any_certificate_and_name(pki: PKI) -> None:
    cfg = TLSConfig(verify=False, server_name="elsewhere.example")
    context = client_context(cfg)
    assert context.verify_mode is ssl.CERT_NONE
    assert context.check_hostname is False
    assert connect(cfg, pki.other_server)[0] == b"hi\n"


# --- mutual TLS ---------------------------------------------------------------------------


def test_mutual_tls(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key)

    async def go() -> list[dict[str, Any]]:
        async with tls_server(pki.server, client_ca=pki.ca.cert) as srv:
            greeting, _ = await exchange(client_context(cfg), srv.port, LOCALHOST)
            assert greeting == b"hi\n"
            return srv.peer_certs

    (peer,) = run(go())
    assert (("commonName", "client"),) in peer["subject"]


def test_a_server_that_wants_a_client_certificate_says_so(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert)
    exc, server_error = refused(cfg, pki.server, client_ca=pki.ca.cert)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in server_error
    assert describe_tls_error(exc) == (
        "the server requires a client certificate (set tls.cert_file and tls.key_file)"
    )


def test_a_client_certificate_the_server_does_not_trust_is_refused(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key)
    exc, server_error = refused(cfg, pki.server, client_ca=pki.other_ca.cert)
    assert "CERTIFICATE_VERIFY_FAILED" in server_error
    assert describe_tls_error(exc).startswith("the server refused our client certificate")


# --- versions -----------------------------------------------------------------------------


def test_min_version_sets_the_floor() -> None:
    assert client_context(TLSConfig()).minimum_version is ssl.TLSVersion.TLSv1_2
    assert client_context(TLSConfig(min_version="1.2")).minimum_version is ssl.TLSVersion.TLSv1_2
    assert client_context(TLSConfig(min_version="1.3")).minimum_version is ssl.TLSVersion.TLSv1_3


def test_min_1_2_talks_to_a_1_2_server(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, min_version="1.2")
    assert connect(cfg, pki.server, max_version=ssl.TLSVersion.TLSv1_2) == (b"hi\n", "TLSv1.2")


def test_min_1_3_refuses_a_1_2_server(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, min_version="1.3")
    exc, server_error = refused(cfg, pki.server, max_version=ssl.TLSVersion.TLSv1_2)
    assert "UNSUPPORTED_PROTOCOL" in server_error
    assert describe_tls_error(exc) == (
        "the server and forwarder have no TLS version in common (see tls.min_version)"
    )


def test_min_1_3_talks_1_3(pki: PKI) -> None:
    cfg = TLSConfig(ca_file=pki.ca.cert, min_version="1.3")
    assert connect(cfg, pki.server) == (b"hi\n", "TLSv1.3")


def test_a_plain_tcp_port_is_recognised() -> None:
    cfg = TLSConfig(verify=False)

    async def go() -> None:
        async with plain_server(b"HTTP/1.0 400 Bad Request\r\n\r\n") as port:
            await exchange(client_context(cfg), port, LOCALHOST)

    with pytest.raises(ssl.SSLError) as info:
        run(go())
    assert describe_tls_error(info.value) == (
        "the server did not answer in TLS (is it a plain tcp:// port?)"
    )


# --- configuration errors -----------------------------------------------------------------


def _config_error(**fields: Any) -> str:
    with pytest.raises(TLSConfigError) as info:
        client_context(TLSConfig(**fields))
    assert isinstance(info.value, ConfigError)
    assert info.value.__cause__ is None  # no chained traceback from ssl
    return str(info.value)


def test_missing_ca_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    assert (
        _config_error(ca_file=path)
        == f"output.tls.ca_file: can't read {path}: No such file or directory"
    )


def test_ca_file_is_a_directory(tmp_path: Path) -> None:
    message = _config_error(ca_file=tmp_path)
    assert message.startswith(f"output.tls.ca_file: can't read {tmp_path}: ")


def test_ca_file_that_holds_no_certificate(pki: PKI) -> None:
    message = _config_error(ca_file=pki.ca.key)
    assert message == (
        f"output.tls.ca_file: {pki.ca.key} holds no PEM certificate "
        "(no '-----BEGIN CERTIFICATE-----' line)"
    )


def test_ca_file_with_a_broken_certificate(tmp_path: Path) -> None:
    path = tmp_path / "broken.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    message = _config_error(ca_file=path)
    assert message.startswith(f"output.tls.ca_file: can't load the CA certificates in {path}: ")


def test_ca_file_is_read_even_with_verify_off(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    assert "output.tls.ca_file" in _config_error(ca_file=path, verify=False)


def test_missing_cert_file(pki: PKI, tmp_path: Path) -> None:
    path = tmp_path / "client.crt"
    message = _config_error(cert_file=path, key_file=pki.client.key)
    assert message == f"output.tls.cert_file: can't read {path}: No such file or directory"


def test_missing_key_file(pki: PKI, tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    message = _config_error(cert_file=pki.client.cert, key_file=path)
    assert message == f"output.tls.key_file: can't read {path}: No such file or directory"


def test_key_file_that_holds_a_certificate(pki: PKI) -> None:
    message = _config_error(cert_file=pki.client.cert, key_file=pki.client.cert)
    assert message.startswith(f"output.tls.key_file: {pki.client.cert} holds no PEM private key")


def test_cert_file_that_holds_a_key(pki: PKI) -> None:
    message = _config_error(cert_file=pki.client.key, key_file=pki.client.key)
    assert message.startswith(f"output.tls.cert_file: {pki.client.key} holds no PEM certificate")


def test_key_that_does_not_match_the_certificate(pki: PKI) -> None:
    message = _config_error(cert_file=pki.client.cert, key_file=pki.server.key)
    assert message == (
        f"output.tls.key_file: the key in {pki.server.key} does not match the certificate in "
        f"output.tls.cert_file {pki.client.cert}"
    )


def test_encrypted_key_is_refused_without_a_prompt(pki: PKI, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            *("openssl", "pkey", "-in", str(pki.client.key)),
            *("-aes256", "-passout", "pass:pw", "-out", str(encrypted)),
        ],
        check=True,
        capture_output=True,
        timeout=DEADLINE_S,
    )
    message = _config_error(cert_file=pki.client.cert, key_file=encrypted)
    assert message == (
        f"output.tls.key_file: the key in {encrypted} is encrypted with a passphrase; "
        "forwarder needs an unencrypted key"
    )


def test_broken_key(pki: PKI, tmp_path: Path) -> None:
    path = tmp_path / "broken.key"
    path.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    message = _config_error(cert_file=pki.client.cert, key_file=path)
    assert message.startswith(
        f"output.tls.cert_file {pki.client.cert} with output.tls.key_file {path}: can't load them: "
    )


# --- server_hostname ----------------------------------------------------------------------


def test_server_hostname() -> None:
    assert server_hostname(TLSConfig(), "agg.example") == "agg.example"
    assert server_hostname(TLSConfig(server_name="cert.example"), "10.0.0.5") == "cert.example"
    assert server_hostname(TLSConfig(), "") is None


# --- describe_tls_error on its own --------------------------------------------------------


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message} (_ssl.c:1006)"
    )
    exc.verify_code = code
    exc.verify_message = message
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    return exc


def _ssl_error(reason: str, text: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {text} (_ssl.c:1006)")
    exc.reason = reason
    exc.library = "SSL"
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            _verify_error(10, "certificate has expired"),
            "certificate verify failed: certificate has expired "
            "(check the certificate's dates and this host's clock)",
        ),
        (
            _verify_error(18, "self-signed certificate"),
            "certificate verify failed: self-signed certificate "
            "(the server's certificate signs itself; trust it through tls.ca_file)",
        ),
        (
            _verify_error(64, "IP address mismatch, certificate is not valid for '10.0.0.5'."),
            "certificate verify failed: IP address mismatch, certificate is not valid for "
            "'10.0.0.5' (the server's certificate is not for the name we connected to; set "
            "tls.server_name to a name it holds, or fix the certificate)",
        ),
        (_verify_error(999, "something new"), "certificate verify failed: something new"),
        (
            _ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED", "tlsv13 alert certificate required"),
            "the server requires a client certificate (set tls.cert_file and tls.key_file)",
        ),
        (
            _ssl_error("SOME_NEW_REASON", "some new reason"),
            "TLS error: some new reason",
        ),
        (
            ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)"),
            "the server closed the connection without ending TLS (during the handshake: it "
            "refused us, or does not speak TLS)",
        ),
        (ssl.SSLError(1, "[SSL] PEM lib (_ssl.c:3905)"), "TLS error: PEM lib"),
        (ConnectionResetError(104, "Connection reset by peer"), "the server reset the connection"),
        (OSError(113, "No route to host"), "No route to host"),
        (ConnectionResetError(), "the server reset the connection"),
        (TLSConfigError("output.tls.ca_file: can't read /x"), "output.tls.ca_file: can't read /x"),
        (TimeoutError(), "TimeoutError"),
    ],
)
def test_describe_tls_error(exc: BaseException, expected: str) -> None:
    assert describe_tls_error(exc) == expected
