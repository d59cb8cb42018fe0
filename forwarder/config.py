"""Configuration: pydantic models, TOML loading, and errors that name the key or the line.

The TOML file is read here and nowhere else; every other module receives the frozen
:class:`Config`. Each ``Field`` carries its description, so the JSON Schema in ``schemas/``
and the reference table in the README are generated from these models.

Strings may use ``${NAME}`` to take a value from the environment (``$${`` is a literal
``${``). Secrets can also come from files: ``shared_key_file`` and ``password_file``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# --- value types --------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


# The parsers refuse what no field would take, before it can overflow a timedelta or an int:
# a duration past this, a size that is not a finite number. The fields' own bounds are
# narrower, and their descriptions state them.
_LONGEST_S = 1e9  # about 31 years


def parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError('expected a duration like "250ms", "1s", "2m", or seconds')
    seconds: float | None = None
    if isinstance(value, int):
        seconds = float(min(value, _LONGEST_S + 1))  # a huge int overflows a float
    elif isinstance(value, float):
        if math.isnan(value):
            raise ValueError("nan is not a number of seconds")
        seconds = value
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds is None:
        raise ValueError(f'{value!r} is not a duration like "250ms", "1s", "2m", "1h"')
    if seconds < 0:
        raise ValueError("a duration can't be negative")
    if not seconds <= _LONGEST_S:
        raise ValueError("far too long a duration")
    return timedelta(seconds=seconds)


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError('expected a size like "512KiB", "8MiB", or a number of bytes')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size can't be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number = float(match[1]) * _SIZE_UNITS[match[2]]
            if not math.isfinite(number):
                raise ValueError("far too large a size")
            return int(number)
    raise ValueError(f'{value!r} is not a size like "512KiB", "8MiB", "1GiB" or bytes')


@dataclass(frozen=True)
class Bounds:
    """The range a duration or size field accepts, in the config's own units. The field's
    description states :attr:`text`; a test keeps the two in step."""

    low: str
    high: str
    off: str | None = None  # a value outside the range that means "off", such as "0s"

    @property
    def text(self) -> str:
        span = f"{self.low} to {self.high}"
        return f'"{self.off}" or {span}' if self.off is not None else span

    def __call__(self, value: Any) -> Any:
        parse = parse_duration if isinstance(value, timedelta) else parse_size
        if self.off is not None and value == parse(self.off):
            return value
        if not parse(self.low) <= value <= parse(self.high):
            off = f' (or "{self.off}" for off)' if self.off is not None else ""
            raise ValueError(f"must be from {self.low} to {self.high}{off}")
        return value


def _bounds(low: str, high: str, *, off: str | None = None) -> AfterValidator:
    return AfterValidator(Bounds(low, high, off))


def _parse_path(value: object) -> object:
    """A path from the file: a non-empty string (strict mode refuses a str for a Path)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("the path is empty")
        return Path(value)
    if value is not None and not isinstance(value, Path):
        raise ValueError("expected a path, as a string")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _DURATION_RE.pattern},
                {"type": "number", "minimum": 0},
            ]
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _SIZE_RE.pattern},
                {"type": "integer", "minimum": 0},
            ]
        }
    ),
]


def _duration_default(text: str) -> Any:
    # Defaults are written as the user would write them, so that the schema and the docs show
    # "1s" rather than a serialised timedelta; validate_default turns them into timedelta.
    return text


def _size_default(text: str) -> Any:
    return text


class _Section(BaseModel):
    # strict: TOML has real booleans and integers, so "no" is not false and "60" is not 60;
    # durations, sizes and paths take their string forms through their own validators.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        validate_default=True,
        use_attribute_docstrings=False,
    )


# --- sections -----------------------------------------------------------------------------


def _default_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class DockerConfig(_Section):
    enabled: bool = Field(
        default=True,
        description="Follow the containers of a Docker Engine; false on nodes without one "
        "(containerd or CRI-O Kubernetes nodes, read through [kubernetes]).",
    )
    host: str = Field(
        default_factory=_default_docker_host,
        description="The Docker Engine API address: unix:///path, tcp://host:port. "
        "Default: $DOCKER_HOST, else unix:///var/run/docker.sock.",
        json_schema_extra={"default": "$DOCKER_HOST or unix:///var/run/docker.sock"},
    )
    read_from: Literal["tail", "head"] = Field(
        default="tail",
        description='For containers already running at the very first start: "tail" reads '
        'from now, "head" reads their whole log. Containers started later are always read '
        "whole, and a container with a saved position resumes from it.",
    )
    max_line_bytes: Annotated[Size, _bounds("1KiB", "64MiB")] = Field(
        default=_size_default("1MiB"),
        description="The longest line, after joining the pieces the engine splits long lines "
        "into. A longer line is split at this size, and the log says so. 1KiB to 64MiB.",
    )
    exclude_self: bool = Field(
        default=True,
        description="Skip the container forwarder itself runs in, so its own log can't feed "
        "back into itself.",
    )
    exclude_label: str = Field(
        default="forwarder.exclude",
        description='Containers with this label set to "true" are not followed.',
    )
    log_source: Literal["auto", "file", "api"] = Field(
        default="auto",
        description='Where log lines are read: "file" reads the engine\'s json-file logs from '
        'disk (the LogPath inspect reports, under containers_dir); "api" reads them through the '
        'Engine API; "auto" reads from disk each container whose log driver is json-file and '
        "whose file forwarder can read (a local engine, the directory mounted), and any other "
        'through the API. With "file", a container that can\'t be read from disk is not '
        "followed, and the log says so once.",
    )
    containers_dir: str = Field(
        default="",
        description="Where the engine's containers/ directory (<data-root>/containers) is "
        "mounted inside forwarder's container, e.g. /var/lib/docker/containers mounted "
        "read-only. Empty: the LogPath the engine reports is used as it is.",
    )

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "unix" and parts.path:
            return value
        if parts.scheme in {"tcp", "http", "https"} and parts.hostname:
            _check_port(value, parts, required=False)
            return value
        raise ValueError(f"{value!r} is not unix:///path or tcp://host:port")


class ContainerMatcher(_Section):
    """Picks containers: every key given must match (globs use ``*``, ``?`` and ``[...]``)."""

    name: str | None = Field(
        default=None,
        description='Glob on the container name, without the leading "/" ("web-*").',
    )
    image: str | None = Field(
        default=None,
        description='Glob on the image name, tried with and without its tag ("nginx*", '
        '"nginx:1.27", "registry.example/app*").',
    )
    label: str | None = Field(
        default=None,
        description='"key": the label is set; "key=glob": its value matches the glob.',
    )
    compose_project: str | None = Field(
        default=None, description="Glob on the com.docker.compose.project label."
    )
    compose_service: str | None = Field(
        default=None, description="Glob on the com.docker.compose.service label."
    )

    @field_validator("name", "image", "label", "compose_project", "compose_service")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty; leave the key out instead")
        return value

    @field_validator("name")
    @classmethod
    def _no_slash(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("/"):
            raise ValueError('a name glob is written without the leading "/"')
        return value

    @field_validator("label")
    @classmethod
    def _label_key(cls, value: str | None) -> str | None:
        if value is not None and not value.partition("=")[0].strip():
            raise ValueError('expected "key" or "key=value-glob": the key is missing')
        return value

    @model_validator(mode="after")
    def _some_key(self) -> ContainerMatcher:
        if not any(getattr(self, key) is not None for key in type(self).model_fields):
            keys = ", ".join(type(self).model_fields)
            raise ValueError(f"a matcher needs at least one of: {keys}")
        return self


class ContainersConfig(_Section):
    include: list[ContainerMatcher] = Field(
        default_factory=list,
        description="Follow only containers matching one of these (none: every container). "
        'Opt-in mode: [{ label = "forwarder.enable=true" }].',
    )
    exclude: list[ContainerMatcher] = Field(
        default_factory=list,
        description="Never follow containers matching one of these (docker.exclude_label "
        "applies as well).",
    )
    stats: bool = Field(
        default=True,
        description="Stats records for the followed containers (stats.interval sets how often).",
    )
    lifecycle: bool = Field(
        default=True, description="Lifecycle records for the followed containers."
    )


def _check_regex(value: str) -> str:
    if value:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
    return value


RecordExtraKey = Literal[
    "image", "image_id", "compose_project", "compose_service", "host", "docker"
]


class RecordsConfig(_Section):
    labels: list[str] = Field(
        default_factory=list,
        description="Container labels added as top-level keys of log records, as Docker's "
        "fluentd driver does with --log-opt labels=.",
    )
    labels_regex: Annotated[str, AfterValidator(_check_regex)] = Field(
        default="",
        description="Labels whose key matches this regular expression are added too "
        "(--log-opt labels-regex=).",
    )
    env: list[str] = Field(
        default_factory=list,
        description="Environment variables of the container added as top-level keys "
        "(--log-opt env=); on a clash with a label, the variable wins.",
    )
    env_regex: Annotated[str, AfterValidator(_check_regex)] = Field(
        default="",
        description="Environment variables whose name matches this regular expression are "
        "added too (--log-opt env-regex=).",
    )
    extra: list[RecordExtraKey] = Field(
        default_factory=list,
        description='Richer keys, off by default: "image", "image_id", "compose_project", '
        '"compose_service", "host" (the engine\'s name), or "docker" (all of them in one '
        "nested map).",
    )


MultilinePreset = Literal["java", "python", "go", "ruby"]


class MultilineRule(_Section):
    match: ContainerMatcher | None = Field(
        default=None,
        description="The containers this rule applies to (unset: every container); the "
        "first rule that matches wins.",
    )
    preset: MultilinePreset | None = Field(
        default=None,
        description='Built-in grammar: "java", "python", "go" (panics and goroutine dumps), '
        '"ruby". Or set start_pattern / continue_pattern instead.',
    )
    start_pattern: Annotated[str, AfterValidator(_check_regex)] | None = Field(
        default=None,
        description="A line matching this regex starts a group; with no continue_pattern, "
        "every line that does not match it continues the group.",
    )
    continue_pattern: Annotated[str, AfterValidator(_check_regex)] | None = Field(
        default=None,
        description="A line matching this regex continues the group before it.",
    )
    max_lines: int = Field(
        default=500, ge=2, le=100_000, description="A group is sent when it has this many lines."
    )
    max_bytes: Annotated[Size, _bounds("1KiB", "64MiB")] = Field(
        default=_size_default("1MiB"),
        description="A group is sent when its text reaches this size. 1KiB to 64MiB.",
    )
    flush_timeout: Annotated[Duration, _bounds("1ms", "1h")] = Field(
        default=_duration_default("1s"),
        description="A pending group is sent as is after this long without a new line. 1ms to 1h.",
    )

    @model_validator(mode="after")
    def _one_grammar(self) -> MultilineRule:
        custom = self.start_pattern is not None or self.continue_pattern is not None
        if self.preset is not None and custom:
            raise ValueError("set preset, or start_pattern/continue_pattern, not both")
        if self.preset is None and not custom:
            raise ValueError("set preset, or start_pattern and/or continue_pattern")
        return self


class KubernetesConfig(_Section):
    enabled: bool = Field(
        default=False,
        description="Follow the CRI log files the kubelet's runtime (containerd, CRI-O) writes "
        "under pods_dir: on Kubernetes nodes without Docker Engine.",
    )
    pods_dir: str = Field(
        default="/var/log/pods",
        description="Where the kubelet's pod log directories are (mounted read-only): "
        "<namespace>_<pod>_<uid>/<container>/<restart>.log.",
    )
    containers_dir: str = Field(
        default="/var/log/containers",
        description="The kubelet's links <pod>_<namespace>_<container>-<container id>.log; "
        "a log is followed once its link names its container id.",
    )
    metadata: Literal["path", "api"] = Field(
        default="path",
        description='"path": the kubernetes map (namespace_name, pod_name, pod_id, '
        'container_name, container_id, restart_count) from the file path alone. "api" (pod '
        "labels and annotations from the API server) is not implemented yet and is refused.",
    )
    node_name: str = Field(
        default="",
        description="This node's name, for the API server watch of its pods (metadata = "
        '"api"): "${NODE_NAME}", with NODE_NAME set from the downward API (spec.nodeName).',
    )
    max_line_bytes: Annotated[Size, _bounds("1KiB", "64MiB")] = Field(
        default=_size_default("1MiB"),
        description="The longest line, after joining the P pieces of a stream. A longer line "
        "is split at this size, and the log says so. 1KiB to 64MiB.",
    )

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: str) -> str:
        if value == "api":
            raise ValueError(
                'metadata = "api" (pod labels and annotations from the API server) is not '
                'implemented yet; use "path"'
            )
        return value


class ServerConfig(_Section):
    url: str = Field(description="tcp://host:port, tls://host:port or unix:///path.")
    weight: int = Field(
        default=60,
        ge=0,
        le=10000,
        description="Share of chunks, by weight; 0 takes the server out, as in Fluentd.",
    )
    standby: bool = Field(
        default=False, description="Used only while no primary server is healthy."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parse_server_url(value)
        return value

    @property
    def endpoint(self) -> Endpoint:
        return parse_server_url(self.url)


class Endpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    scheme: Literal["tcp", "tls", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _check_port(value: str, parts: SplitResult, *, required: bool) -> int | None:
    """The URL's port, which must be 1-65535; ValueError says why not."""
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a number, or out of urllib's 0-65535
    if port is None and not required:
        return None
    if port is None:
        raise ValueError(f"{value!r} is not tcp://host:port: the port is missing")
    if not 1 <= port <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return port


def parse_server_url(value: str) -> Endpoint:
    """Parse ``tcp://host:port``, ``tls://host:port`` or ``unix:///path``."""
    problem = f"{value!r} is not tcp://host:port, tls://host:port or unix:///path"
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(problem) from exc
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(problem)
        return Endpoint(scheme="unix", path=parts.path)
    if parts.scheme in {"tcp", "tls"}:
        if not parts.hostname or parts.path not in {"", "/"} or parts.query:
            raise ValueError(problem)
        port = _check_port(value, parts, required=True)
        assert port is not None
        return Endpoint(scheme=parts.scheme, host=parts.hostname, port=port)
    raise ValueError(problem)


def _coerce_servers(value: object) -> object:
    if isinstance(value, list):
        return [{"url": item} if isinstance(item, str) else item for item in value]
    return value


class TLSConfig(_Section):
    ca_file: Path | None = Field(
        default=None, description="CA bundle to verify servers with; default: the system store."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    verify: bool = Field(default=True, description="Verify the server certificate and name.")
    server_name: str | None = Field(
        default=None, description="Name to expect in the certificate; default: the URL's host."
    )
    min_version: Literal["1.2", "1.3"] = Field(default="1.2", description="Lowest TLS version.")

    _paths = field_validator("ca_file", "cert_file", "key_file", mode="before")(_parse_path)

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class OutputConfig(_Section):
    mode: Literal["forward", "stdout"] = Field(
        default="forward",
        description='"forward" ships to the servers; "stdout" prints each record as a JSON '
        "line, for trying forwarder out.",
    )
    servers: Annotated[list[ServerConfig], BeforeValidator(_coerce_servers)] = Field(
        default_factory=lambda: [ServerConfig(url="tcp://127.0.0.1:24224")],
        min_length=1,
        description="Forward servers: URLs, or tables {url, weight, standby}.",
        json_schema_extra={"default": ["tcp://127.0.0.1:24224"]},
    )
    flush_interval: Annotated[Duration, _bounds("1ms", "1h")] = Field(
        default=_duration_default("1s"),
        description="The longest a record waits before its chunk is sent. A chunk is also sent "
        "at once when the input goes quiet. 1ms to 1h.",
    )
    chunk_limit: Annotated[Size, _bounds("1KiB", "64MiB")] = Field(
        default=_size_default("1MiB"),
        description="The largest chunk, in bytes (a single longer record makes a chunk of its "
        "own). 1KiB to 64MiB.",
    )
    require_ack: bool = Field(default=True, description="Ask the server to ack every chunk.")
    ack_timeout: Annotated[Duration, _bounds("1ms", "1h")] = Field(
        default=_duration_default("30s"),
        description="How long to wait for a chunk's ack. 1ms to 1h.",
    )
    connect_timeout: Annotated[Duration, _bounds("1ms", "1h")] = Field(
        default=_duration_default("10s"),
        description="How long a connection attempt may take: TCP, TLS and the handshake. "
        "1ms to 1h.",
    )
    compress: Literal["none", "gzip"] = Field(
        default="none", description='"gzip" sends CompressedPackedForward.'
    )
    buffer_limit: Annotated[Size, _bounds("1KiB", "16GiB")] = Field(
        default=_size_default("64MiB"),
        description="Bytes of chunks held in memory before the followers pause. 1KiB to 16GiB, "
        "and at least chunk_limit.",
    )
    retry_wait: Annotated[Duration, _bounds("1ms", "1h")] = Field(
        default=_duration_default("1s"),
        description="How long a failed server is left alone at first; the wait doubles, with "
        "jitter, at each failure in a row. 1ms to 1h.",
    )
    retry_max_wait: Annotated[Duration, _bounds("1ms", "24h")] = Field(
        default=_duration_default("60s"),
        description="The longest wait between resends. 1ms to 24h, and at least retry_wait.",
    )
    heartbeat_interval: Annotated[Duration, _bounds("1ms", "1h", off="0s")] = Field(
        default=_duration_default("1s"),
        description='How often an unreachable server is probed with a TCP connect; "0s": no '
        'probes, it waits out its backoff. "0s" or 1ms to 1h.',
    )
    self_hostname: str = Field(
        default_factory=platform.node,
        description="Our name in the handshake. Default: the host's name.",
        json_schema_extra={"default": "the host's name"},
    )
    shared_key: str | None = Field(default=None, description="Shared key for the handshake.")
    shared_key_file: Path | None = Field(
        default=None, description="A file holding the shared key (trailing newline ignored)."
    )
    username: str | None = Field(default=None, description="User for the handshake's user auth.")
    password: str | None = Field(default=None, description="Password for the user auth.")
    password_file: Path | None = Field(
        default=None, description="A file holding the password (trailing newline ignored)."
    )
    tls: TLSConfig = Field(default_factory=TLSConfig, description="TLS for tls:// servers.")

    _paths = field_validator("shared_key_file", "password_file", mode="before")(_parse_path)

    @model_validator(mode="after")
    def _check(self) -> OutputConfig:
        if self.shared_key is not None and self.shared_key_file is not None:
            raise ValueError("set shared_key or shared_key_file, not both")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        has_key = self.shared_key is not None or self.shared_key_file is not None
        has_password = self.password is not None or self.password_file is not None
        if self.shared_key == "":
            raise ValueError("shared_key is empty (an unset ${VARIABLE}?)")
        if has_password and self.username is None:
            raise ValueError("password is set but username is not")
        if (self.username is not None or has_password) and not has_key:
            raise ValueError(
                "username and password are sent in the handshake, which needs shared_key "
                "(or shared_key_file)"
            )
        if not any(server.weight > 0 for server in self.servers):
            raise ValueError("every server has weight 0: none would get chunks")
        if self.retry_max_wait < self.retry_wait:
            raise ValueError("retry_max_wait is shorter than retry_wait")
        if self.buffer_limit < self.chunk_limit:
            raise ValueError(
                f"buffer_limit ({self.buffer_limit} bytes) is smaller than chunk_limit "
                f"({self.chunk_limit} bytes): memory must hold at least one chunk"
            )
        return self

    def secret_shared_key(self) -> str | None:
        """The shared key, from the config or its file; ConfigError names the key."""
        return _read_secret(self.shared_key, self.shared_key_file, "output.shared_key_file")

    def secret_password(self) -> str | None:
        """The password, from the config or its file; ConfigError names the key."""
        return _read_secret(self.password, self.password_file, "output.password_file")


def _read_secret(value: str | None, path: Path | None, key: str) -> str | None:
    if path is None:
        return value
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}: can't read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret


class StateConfig(_Section):
    dir: Path = Field(
        default=Path("/var/lib/forwarder"),
        description="Where positions and the disk buffer live.",
    )

    _paths = field_validator("dir", mode="before")(_parse_path)

    def check_access(self) -> None:
        """Create ``dir`` if need be and check that forwarder can write there and read what
        it holds, as ``run`` will at start; ConfigError names the key and the reason."""
        where = self.dir
        step = "create"
        try:
            where.mkdir(parents=True, exist_ok=True)
            step = "write to"
            with tempfile.TemporaryFile(dir=where, prefix=".forwarder-probe-"):
                pass
            for name in ("positions.json", "buffer"):
                path = where / name
                step = f"read {path} in"
                if path.is_file():
                    path.open("rb").close()
                elif path.is_dir():
                    os.listdir(path)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"state.dir: can't {step} {where}: {reason}") from None


class TagsConfig(_Section):
    logs: str = Field(
        default="docker.{{.Name}}",
        description="Tag of log records, in Docker's tag template syntax: {{.ID}} {{.FullID}} "
        "{{.Name}} {{.ImageName}} {{.ImageID}} {{.ImageFullID}} {{.DaemonName}}, and labels: "
        '{{index .ContainerLabels "com.docker.compose.service"}}.',
    )
    stats: str = Field(default="docker.stats.{{.Name}}", description="Tag of stats records.")
    events: str = Field(
        default="docker.events.{{.Name}}", description="Tag of lifecycle event records."
    )
    kubernetes: str = Field(
        default="kubernetes.var.log.containers.{{.PodName}}_{{.Namespace}}_{{.ContainerName}}-"
        "{{.ContainerID}}.log",
        description="Tag of the log records of [kubernetes]: {{.PodName}} {{.Namespace}} "
        "{{.PodID}} {{.ContainerName}} {{.ContainerID}} {{.RestartCount}}. The default is "
        "the tag in_tail gives a line of /var/log/containers/<pod>_<namespace>_<container>-"
        "<id>.log with tag kubernetes.*.",
    )

    @field_validator("logs", "stats", "events")
    @classmethod
    def _check_template(cls, value: str) -> str:
        from forwarder.tags import compile_template

        compile_template(value)
        return value

    @field_validator("kubernetes")
    @classmethod
    def _check_kubernetes_template(cls, value: str) -> str:
        from forwarder.kubernetes.metadata import compile_tag

        compile_tag(value)
        return value


class StatsConfig(_Section):
    interval: Annotated[Duration, _bounds("1s", "24h", off="0s")] = Field(
        default=_duration_default("10s"),
        description='How often each container\'s stats are shipped; "0s" turns stats off. '
        '"0s" or 1s to 24h (the engine samples once a second).',
    )
    source: Literal["auto", "cgroup", "api"] = Field(
        default="auto",
        description='Where the figures come from: "cgroup" reads the host\'s cgroup files '
        "(v1 or v2) under cgroup_root and the container's network counters under proc_root, "
        'sparing dockerd and containerd a Stats API request per container per interval; "api" '
        'asks the Stats API; "auto" reads the files where they are readable and asks the API '
        'for the other containers. With "cgroup", a container whose files can\'t be read is '
        "logged once and sampled through the API.",
    )
    cgroup_root: str = Field(
        default="/sys/fs/cgroup",
        description="Where the host's cgroup tree is mounted (inside forwarder's container, "
        "mount the host's /sys/fs/cgroup read-only).",
    )
    proc_root: str = Field(
        default="/proc",
        description="Where the host's /proc is mounted: the containers' processes must be "
        "visible there (their cgroup and network counters); inside a container, run with "
        "--pid=host or mount the host's /proc elsewhere.",
    )


class BufferConfig(_Section):
    mode: Literal["spill", "always", "memory"] = Field(
        default="spill",
        description='"spill": chunks stay in memory while the aggregator keeps up, and go to '
        'disk while it is away, when memory is full, and at shutdown. "always": every chunk '
        'is written to disk before it is sent. "memory": no disk buffer; positions move only '
        "on acks, and the followers pause when memory is full.",
    )
    max_bytes: Annotated[Size, _bounds("64KiB", "1024GiB")] = Field(
        default=_size_default("256MiB"),
        description="The most the disk buffer under [state] dir may hold. 64KiB to 1024GiB, "
        "and more than twice [output] chunk_limit (a chunk goes to disk only if it is under "
        'half of max_bytes); not used with mode = "memory".',
    )
    overflow: Literal["block", "drop_oldest"] = Field(
        default="block",
        description='When the buffer is full: "block" pauses the followers (the engine\'s log '
        'files hold the data); "drop_oldest" drops the oldest chunk, counted and logged.',
    )


def _check_listen(value: str) -> str:
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('must be "host:port" (port 1 to 65535), or "" for off')
    if host.startswith("[") != host.endswith("]"):
        raise ValueError("an IPv6 host goes in brackets: [::1]:24231")
    return value


def split_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); an empty or ``[::]`` host is taken as is."""
    host, _, port = value.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


class ServiceConfig(_Section):
    shutdown_timeout: Annotated[Duration, _bounds("0s", "1h")] = Field(
        default=_duration_default("10s"),
        description="On SIGTERM, how long to keep delivering before exiting. 0s to 1h.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The collector's own log level (to stderr)."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description='The collector\'s own log lines: "text" for people; "json", one object '
        "per line (time, level, logger, message, and fields such as container, server, "
        "reason), for an aggregator to parse.",
    )
    http_listen: Annotated[str, AfterValidator(_check_listen)] = Field(
        default="127.0.0.1:24231",
        description="host:port of the HTTP listener serving /metrics (Prometheus), /healthz, "
        '/readyz and POST /-/reload; "" turns it off. Taken by another process: logged, '
        "and tried again every few seconds; shipping goes on meanwhile.",
    )


class Config(_Section):
    docker: DockerConfig = Field(default_factory=DockerConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    tags: TagsConfig = Field(default_factory=TagsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    containers: ContainersConfig = Field(default_factory=ContainersConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    multiline: list[MultilineRule] = Field(
        default_factory=list,
        description="[[multiline]] rules: which containers' lines are joined into one "
        "record, and how. A container labelled forwarder.multiline=<preset> needs no rule.",
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        # The disk buffer takes a chunk only if it is under half of max_bytes (buffer.py).
        if self.buffer.mode != "memory" and self.buffer.max_bytes <= 2 * self.output.chunk_limit:
            raise ValueError(
                f"buffer.max_bytes ({self.buffer.max_bytes} bytes) must be more than twice "
                f"output.chunk_limit ({self.output.chunk_limit} bytes): the disk buffer takes "
                "a chunk only if it is under half of max_bytes"
            )
        return self


# --- the environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """What forwarder reads from its process environment besides the config file.

    These stay out of the config file on purpose: ``DOCKER_TLS_VERIFY`` is Docker's own
    variable, which aiodocker reads too (with ``DOCKER_CERT_PATH``), so a config key would be a
    second spelling that only half the code obeys; ``FORWARDER_SELF_CONTAINER_ID`` names
    forwarder's own container where ``/proc`` can't tell it (``docker.exclude_self``), an
    override for odd runtimes and tests. (``DOCKER_HOST`` is ``docker.host``'s default.)
    """

    docker_tls_verify: bool = False
    """``DOCKER_TLS_VERIFY=1``: a ``tcp://`` engine is reached over TLS, by aiodocker."""
    self_container_id: str | None = None
    """``FORWARDER_SELF_CONTAINER_ID``: forwarder's own container, overriding ``/proc``."""

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if env is None else env
        return cls(
            docker_tls_verify=env.get("DOCKER_TLS_VERIFY", "0") == "1",
            self_container_id=env.get("FORWARDER_SELF_CONTAINER_ID") or None,
        )


# --- loading ------------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is wrong; the message names the key or the line."""


_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            if match[0] == "$${":
                return "${"
            name = match[1]
            if name not in env:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return env[name]

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else k, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    if not loc:  # a check across sections: its message names the keys
        return str(error["msg"]).removeprefix("Value error, ")
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(error["loc"][:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent else ""
        return f"{loc}: unknown key" + (f" (allowed: {allowed})" if allowed else "")
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if "input" in error and kind not in {"missing"} and not isinstance(error["input"], dict):
        shown = repr(error["input"])
        if len(shown) > 80:
            shown = shown[:60] + f"... ({len(shown)} characters)"
        if loc.endswith(("shared_key", "password")):
            shown = "(hidden)"
        return f"{loc}: {message} (got {shown})"
    return f"{loc}: {message}"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            inner = [candidate, *getattr(candidate, "__args__", ())]
            found = next(
                (c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)), None
            )
            if found is not None:
                model = found
                break
        else:
            return None
    return model


def config_from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    expanded = _expand_env(dict(data), "", os.environ if env is None else env)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: Path | str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read and check a TOML config; ``None`` gives the defaults."""
    if path is None:
        return config_from_dict({}, env)
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: can't read the config: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in the name
        raise ConfigError(f"{path!r}: can't read the config: {exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested far too deeply") from None
    try:
        return config_from_dict(data, env)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested far too deeply") from None
