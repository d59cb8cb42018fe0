"""A throwaway PKI for TLS tests, made with the ``openssl`` command-line tool.

``make_pki(tmpdir)`` writes two unrelated CAs and certificates signed by them:

- ``ca``: signs ``server`` (for ``localhost`` and ``127.0.0.1``) and ``client`` (client auth);
- ``other_ca``: signs ``other_server`` (same names), which a client trusting only ``ca``
  must refuse.

Keys are ECDSA P-256 (quick to make). Every certificate is valid from now for 30 days.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Each openssl call is quick; this bounds a hung one.
_OPENSSL_TIMEOUT_S = 30


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: CertPair
    server: CertPair
    client: CertPair
    other_ca: CertPair
    other_server: CertPair
    names: tuple[str, ...]  # what the server certificates are valid for


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(
            ["openssl", *args],
            cwd=cwd,
            check=True,
            capture_output=True,
            timeout=_OPENSSL_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace")
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{stderr}") from exc


def _key(path: Path) -> Path:
    _run(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        str(path),
        cwd=path.parent,
    )
    return path


def _ca(directory: Path, name: str) -> CertPair:
    key = _key(directory / f"{name}.key")
    cert = directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "[v3_ca]\n"
        "basicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid:always\n"
    )
    _run(
        "req",
        "-x509",
        "-new",
        "-key",
        str(key),
        "-subj",
        f"/CN=forwarder test {name}",
        "-days",
        "30",
        "-config",
        str(ext),
        "-extensions",
        "v3_ca",
        "-out",
        str(cert),
        cwd=directory,
    )
    return CertPair(cert=cert, key=key)


def _leaf(directory: Path, name: str, ca: CertPair, extensions: str) -> CertPair:
    key = _key(directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    cert = directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid:always\n" + extensions
    )
    _run("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr), cwd=directory)
    _run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-set_serial",
        str(secrets.randbits(62) + 1),
        "-days",
        "30",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
        cwd=directory,
    )
    return CertPair(cert=cert, key=key)


def make_pki(tmpdir: Path | str) -> PKI:
    """Write the CAs, keys and certificates under ``tmpdir``; needs ``openssl`` on PATH."""
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    names = ("localhost", "127.0.0.1")
    server_ext = (
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
    )
    client_ext = "keyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n"
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    return PKI(
        ca=ca,
        server=_leaf(directory, "server", ca, server_ext),
        client=_leaf(directory, "client", ca, client_ext),
        other_ca=other_ca,
        other_server=_leaf(directory, "other-server", other_ca, server_ext),
        names=names,
    )
