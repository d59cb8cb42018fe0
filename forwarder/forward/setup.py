"""The output's configuration glue: the handshake's credentials and the check that reads
every file the output needs (``forwarder check``), without opening a connection."""

from __future__ import annotations

from forwarder.config import OutputConfig
from forwarder.forward import tls
from forwarder.forward.connection import HandshakeFactory
from forwarder.forward.handshake import ClientHandshake, Credentials


def handshake_factory(cfg: OutputConfig) -> HandshakeFactory | None:
    """A fresh :class:`ClientHandshake` per connection when ``shared_key`` is set (the
    secrets are read now, from the config or their files)."""
    shared_key = cfg.secret_shared_key()
    if shared_key is None:
        return None
    credentials = Credentials(
        self_hostname=cfg.self_hostname,
        shared_key=shared_key,
        username=cfg.username or "",
        password=cfg.secret_password() or "",
    )
    return lambda: ClientHandshake(credentials)


def uses_tls(cfg: OutputConfig) -> bool:
    return any(server.endpoint.scheme == "tls" for server in cfg.servers)


def check_output(cfg: OutputConfig) -> None:
    """Read the files the output needs (secrets, TLS certificates and keys) as it will at
    start; a :class:`~forwarder.config.ConfigError` names the key and the file. Nothing
    read is kept or shown."""
    if cfg.mode != "forward":
        return
    cfg.secret_shared_key()
    cfg.secret_password()
    if uses_tls(cfg):
        tls.client_context(cfg.tls)
