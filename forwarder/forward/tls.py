"""TLS for ``tls://`` servers: the client's SSLContext, and errors a person can read.

:func:`client_context` is built once from ``[output.tls]`` and shared by every connection.
It verifies the server's certificate and name unless ``verify = false`` (then the caller
logs a warning once). A file it can't use raises :class:`TLSConfigError`, naming the key and
the file. :func:`describe_tls_error` turns what ``ssl`` raises during a handshake into one
sentence for the log.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from forwarder.config import ConfigError, TLSConfig

__all__ = ["TLSConfigError", "client_context", "describe_tls_error", "server_hostname"]

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ConfigError):
    """A TLS file in the configuration can't be used; the message names the key and file."""


def client_context(cfg: TLSConfig) -> ssl.SSLContext:
    """The SSLContext for connections to ``tls://`` servers.

    - CAs: ``ca_file`` if set, else the system store;
    - ``cert_file`` and ``key_file``: our certificate, for servers that ask for one;
    - ``verify = false``: no certificate or name check at all;
    - ``min_version``: the lowest TLS version offered.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = _MIN_VERSIONS[cfg.min_version]
    if cfg.ca_file is not None:
        _load_ca(context, cfg.ca_file)
    elif cfg.verify:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not cfg.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cfg.cert_file is not None and cfg.key_file is not None:
        _load_cert_chain(context, cfg.cert_file, cfg.key_file)
    return context


def server_hostname(cfg: TLSConfig, endpoint_host: str) -> str | None:
    """The name to send (SNI) and to expect in the certificate: ``server_name`` or the host."""
    return cfg.server_name or endpoint_host or None


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TLSConfigError(f"output.tls.{key}: can't read {path}: {reason}") from None


def _check_pem(data: bytes, path: Path, key: str, marker: bytes, what: str) -> None:
    if marker not in data:
        raise TLSConfigError(
            f"output.tls.{key}: {path} holds no PEM {what} (no '{marker.decode()}' line)"
        )


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    data = _read(path, "ca_file")
    _check_pem(data, path, "ca_file", b"-----BEGIN CERTIFICATE-----", "certificate")
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"output.tls.ca_file: can't load the CA certificates in {path}: {_ssl_reason(exc)}"
        ) from None


def _load_cert_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    cert = _read(cert_file, "cert_file")
    _check_pem(cert, cert_file, "cert_file", b"-----BEGIN CERTIFICATE-----", "certificate")
    key = _read(key_file, "key_file")
    _check_pem(key, key_file, "key_file", b"PRIVATE KEY-----", "private key")

    def no_passphrase() -> str:
        # Called only for an encrypted key; raising here stops OpenSSL from prompting.
        raise TLSConfigError(
            f"output.tls.key_file: the key in {key_file} is encrypted with a passphrase; "
            "forwarder needs an unencrypted key"
        )

    try:
        context.load_cert_chain(str(cert_file), str(key_file), password=no_passphrase)
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"output.tls.key_file: the key in {key_file} does not match the certificate in "
                f"output.tls.cert_file {cert_file}"
            ) from None
        raise TLSConfigError(
            f"output.tls.cert_file {cert_file} with output.tls.key_file {key_file}: "
            f"can't load them: {_ssl_reason(exc)}"
        ) from None


# --- describing failures ------------------------------------------------------------------

# OpenSSL X509_V_ERR_* codes, with what they mean for us.
_NOT_TRUSTED = "the server's certificate is not signed by a trusted CA"
_NAME_MISMATCH = (
    "the server's certificate is not for the name we connected to; set tls.server_name to a "
    "name it holds, or fix the certificate"
)
_VERIFY_HINTS: dict[int, str] = {
    2: _NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    9: "check the certificate's dates and this host's clock",  # CERT_NOT_YET_VALID
    10: "check the certificate's dates and this host's clock",  # CERT_HAS_EXPIRED
    18: "the server's certificate signs itself; trust it through tls.ca_file",
    19: "the server's chain ends in a CA that is not trusted; see tls.ca_file",
    20: _NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: _NOT_TRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "the server's certificate was revoked",  # CERT_REVOKED
    26: "the certificate is not meant for a TLS server",  # INVALID_PURPOSE
    62: _NAME_MISMATCH,  # HOSTNAME_MISMATCH
    64: _NAME_MISMATCH,  # IP_ADDRESS_MISMATCH
}

_NOT_TLS = "the server did not answer in TLS (is it a plain tcp:// port?)"
_NO_VERSION = "the server and forwarder have no TLS version in common (see tls.min_version)"
_CLIENT_CERT_REFUSED = (
    "the server refused our client certificate (is tls.cert_file signed by a CA the server trusts?)"
)
_REASON_SENTENCES: dict[str, str] = {
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "HTTP_REQUEST": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "UNSUPPORTED_PROTOCOL": _NO_VERSION,
    "NO_PROTOCOLS_AVAILABLE": _NO_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": _NO_VERSION,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the server requires a client certificate (set tls.cert_file and tls.key_file)"
    ),
    "TLSV1_ALERT_UNKNOWN_CA": _CLIENT_CERT_REFUSED,
    "SSLV3_ALERT_BAD_CERTIFICATE": _CLIENT_CERT_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": _CLIENT_CERT_REFUSED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": _CLIENT_CERT_REFUSED,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (
        "the server refused the TLS handshake (no cipher or version in common, or it wants "
        "a client certificate)"
    ),
    "UNEXPECTED_EOF_WHILE_READING": (
        "the server closed the connection without ending TLS (during the handshake: it refused "
        "us, or does not speak TLS)"
    ),
}


def describe_tls_error(exc: BaseException) -> str:
    """One plain sentence for a TLS failure, for the log, such as: "certificate verify
    failed: unable to get local issuer certificate (the server's certificate is not signed
    by a trusted CA)".
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or _ssl_reason(exc)).rstrip(".")
        if message[1:2].islower():  # "Hostname mismatch" -> "hostname mismatch"; "IP" stays
            message = message[:1].lower() + message[1:]
        hint = _VERIFY_HINTS.get(exc.verify_code)
        return f"certificate verify failed: {message}" + (f" ({hint})" if hint else "")
    if isinstance(exc, ssl.SSLEOFError):
        return _REASON_SENTENCES["UNEXPECTED_EOF_WHILE_READING"]
    if isinstance(exc, ssl.SSLError):
        sentence = _REASON_SENTENCES.get(getattr(exc, "reason", None) or "")
        if sentence is not None:
            return sentence
        return f"TLS error: {_ssl_reason(exc)}"
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the bracketed codes and the ``(_ssl.c:1234)`` tail."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = text.split("] ", 1)[-1]
    return text.split(" (_ssl.c:", 1)[0] or type(exc).__name__
