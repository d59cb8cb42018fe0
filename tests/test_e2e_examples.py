"""The ready-made aggregator setups in conf/examples work as shipped.

Each forwarder config passes ``forwarder check`` with the variables it asks for; the Fluentd
pairing runs against FluentServer (``@fluent-org/logger``, the same handshake and TLS as
Fluentd's in_forward) with the shared key and TLS of fluent.conf; the Fluent Bit pairing runs
against a real ``fluent-bit`` binary when ``$FLUENT_BIT`` names one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder.config import load_config
from tests.harness.certs import PKI, make_pki, openssl_available
from tests.harness.collector import CollectorProcess, collector_env, write_config
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import NodeReceiver

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "conf" / "examples"
FORWARDER_CONFIGS = sorted(EXAMPLES.glob("*/forwarder.toml"))
COMPOSE = EXAMPLES / "compose.yaml"
SHARED_KEY = "examples-Shared-Key-29c1"
ENV = {
    "FORWARD_SERVER": "tls://aggregator.example:24224",
    "FORWARD_SHARED_KEY": SHARED_KEY,
}


def check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if not openssl_available():
        pytest.fail("needs the openssl CLI", pytrace=False)
    return make_pki(tmp_path_factory.mktemp("pki"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_there_is_a_forwarder_config_for_each_aggregator() -> None:
    assert [p.parent.name for p in FORWARDER_CONFIGS] == ["fluent-bit", "fluentd"]
    assert (EXAMPLES / "fluentd" / "fluent.conf").is_file()
    assert (EXAMPLES / "fluent-bit" / "fluent-bit.conf").is_file()


@pytest.mark.parametrize("path", FORWARDER_CONFIGS, ids=lambda p: p.parent.name)
def test_each_example_forwarder_config_passes_check(path: Path, pki: PKI) -> None:
    env = {**ENV, "FORWARD_CA_FILE": str(pki.ca.cert)}
    done = check(path, env)
    assert done.returncode == 0, done.stderr
    cfg = load_config(path, env=env)
    assert cfg.output.secret_shared_key() == SHARED_KEY
    assert cfg.output.tls.verify
    assert [s.endpoint.scheme for s in cfg.output.servers] == ["tls"]
    unset = check(path, {})
    assert unset.returncode == 2
    assert "FORWARD_SERVER" in unset.stderr


def test_the_aggregator_configs_use_the_key_and_port_forwarder_sends_to() -> None:
    fluentd = (EXAMPLES / "fluentd" / "fluent.conf").read_text()
    assert "shared_key \"#{ENV['FORWARD_SHARED_KEY']}\"" in fluentd
    assert re.search(r"<transport tls>\s+cert_path \S+\s+private_key_path \S+", fluentd)
    assert "port 24224" in fluentd
    fluent_bit = (EXAMPLES / "fluent-bit" / "fluent-bit.conf").read_text()
    assert re.search(r"Shared_Key\s+\$\{FORWARD_SHARED_KEY\}", fluent_bit)
    assert re.search(r"^\s+tls\s+on$", fluent_bit, re.M)
    assert re.search(r"Port\s+24224", fluent_bit)


def example_config(
    path: Path, engine: Engine, tmp_path: Path, server: str, ca_file: Path
) -> tuple[Path, dict[str, str]]:
    """The example as shipped, on the test engine and with its state in tmp_path; the
    variables it asks for in the environment it returns."""
    sections: dict[str, dict[str, Any]] = {}
    for name, keys in tomllib.loads(path.read_text()).items():
        sections[name] = {k: v for k, v in keys.items() if not isinstance(v, dict)}
        for sub, subkeys in keys.items():
            if isinstance(subkeys, dict):
                sections[f"{name}.{sub}"] = subkeys
    sections["docker"].update(host=engine.host, read_from="head")
    sections["state"]["dir"] = str(tmp_path / "state")
    sections["service"]["http_listen"] = f"127.0.0.1:{free_port()}"
    sections["stats"] = {"interval": "0s"}
    written = write_config(tmp_path / "forwarder.toml", sections)
    env = {
        **collector_env(engine.env),
        "FORWARD_SERVER": server,
        "FORWARD_SHARED_KEY": SHARED_KEY,
        "FORWARD_CA_FILE": str(ca_file),
    }
    return written, env


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    made: list[CollectorProcess] = []
    yield made
    for collector in made:
        collector.stop()


def test_the_fluentd_pairing_delivers_over_tls_with_the_shared_key(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    collectors: list[CollectorProcess],
    pki: PKI,
    tmp_path: Path,
) -> None:
    # fluent.conf's <security> and <transport tls>, as FluentServer spells them
    node = make_node_receiver(
        security={"serverHostname": "aggregator", "sharedKey": SHARED_KEY},
        tls={"key": pki.server.key, "cert": pki.server.cert},
    )
    cid = engine.run("sh", "-c", "seq 1 300; sleep 600")
    path, env = example_config(
        EXAMPLES / "fluentd" / "forwarder.toml",
        engine,
        tmp_path,
        f"tls://localhost:{node.port}",
        pki.ca.cert,
    )
    collector = CollectorProcess(path, env, tmp_path)
    collectors.append(collector.start())

    def lines(records: list[dict[str, Any]]) -> list[str]:
        return [r["record"]["log"] for r in records if r["record"].get("container_id") == cid]

    records = node.wait_for(lambda rs: len(lines(rs)) >= 300, timeout=30)
    assert lines(records) == [str(i) for i in range(1, 301)]
    assert node.auth_failures == []
    assert SHARED_KEY not in collector.log()


def test_the_fluent_bit_pairing_delivers_over_tls_with_the_shared_key(
    engine: Engine, collectors: list[CollectorProcess], pki: PKI, tmp_path: Path
) -> None:
    """Against a real Fluent Bit: ``FLUENT_BIT=/path/to/fluent-bit``."""
    binary = os.environ.get("FLUENT_BIT")
    if not binary:
        pytest.skip("set FLUENT_BIT to a fluent-bit binary to run the real aggregator")
    port = free_port()
    conf = (EXAMPLES / "fluent-bit" / "fluent-bit.conf").read_text()
    conf = conf.replace("/fluent-bit/etc/tls/server.crt", str(pki.server.cert))
    conf = conf.replace("/fluent-bit/etc/tls/server.key", str(pki.server.key))
    conf = re.sub(r"Port\s+24224", f"Port {port}", conf)
    conf = re.sub(r"HTTP_Server\s+On", "HTTP_Server Off", conf)
    conf = conf.replace("0.0.0.0", "127.0.0.1")
    conf_path = tmp_path / "fluent-bit.conf"
    conf_path.write_text(conf)
    out_path = tmp_path / "fluent-bit.out"
    with out_path.open("wb") as out:
        fluent_bit = subprocess.Popen(
            [binary, "-c", str(conf_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "FORWARD_SHARED_KEY": SHARED_KEY},
        )
    try:
        wait_until(
            lambda: _accepts(port) or fluent_bit.poll() is not None,
            timeout=30,
            what="fluent-bit to listen",
        )
        assert fluent_bit.poll() is None, out_path.read_text()
        total = 500
        cid = engine.run("sh", "-c", f"seq 1 {total}; sleep 600")
        path, env = example_config(
            EXAMPLES / "fluent-bit" / "forwarder.toml",
            engine,
            tmp_path,
            f"tls://localhost:{port}",
            pki.ca.cert,
        )
        collector = CollectorProcess(path, env, tmp_path)
        collectors.append(collector.start())

        def lines() -> list[str]:
            got = []
            for line in out_path.read_text(errors="replace").splitlines():
                if cid in line and line.startswith("{"):
                    record = json.loads(line)
                    if "log" in record:
                        got.append(record["log"])
            return got

        wait_until(
            lambda: len(lines()) >= total,
            timeout=60,
            what=lambda: f"{total} lines at fluent-bit:\n{collector.log()[-2000:]}",
        )
        assert lines() == [str(i) for i in range(1, total + 1)]
        assert SHARED_KEY not in collector.log()
    finally:
        fluent_bit.terminate()
        fluent_bit.wait(timeout=30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


# --- compose.yaml ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}`` and ``${NAME:?message}``, as `docker compose config` does them."""

    def one(match: re.Match[str]) -> str:
        name, message = match[1], match[2]
        if name not in env:
            raise KeyError(message or name)
        return env[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::\?([^}]*))?\}", one, value)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) of a service's short-syntax volumes."""
    out = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def test_compose_runs_forwarder_beside_fluent_bit_with_what_it_needs(tmp_path: Path) -> None:
    doc = compose()
    assert set(doc["services"]) == {"forwarder", "fluent-bit"}
    forwarder, fluent_bit = doc["services"]["forwarder"], doc["services"]["fluent-bit"]
    assert (EXAMPLES / forwarder["build"] / "Dockerfile").is_file()
    volumes = mounts(forwarder)
    assert volumes["/var/run/docker.sock"] == ("/var/run/docker.sock", True)
    assert volumes["/var/lib/docker/containers"] == ("/var/lib/docker/containers", True)
    state_volume, _ = volumes["/var/lib/forwarder"]
    assert state_volume in doc["volumes"], "the state lives in a named volume"
    config_source, read_only = volumes["/etc/forwarder/forwarder.toml"]
    assert read_only
    config_path = EXAMPLES / config_source
    assert config_path == EXAMPLES / "fluent-bit" / "forwarder.toml"
    # every file the services mount is in the example, or made by the user under ./tls
    for service in (forwarder, fluent_bit):
        for source, _ in mounts(service).values():
            if source.startswith("./"):
                assert source.startswith("./tls/") or (EXAMPLES / source).is_file(), source

    # the config it mounts passes `forwarder check` with the environment compose gives it
    pki = make_pki(tmp_path / "tls")
    env = {
        k: _interpolate(str(v), {"FORWARD_SHARED_KEY": SHARED_KEY})
        for k, v in forwarder["environment"].items()
    }
    ca_target = env["FORWARD_CA_FILE"]
    assert mounts(forwarder)[ca_target][0] == "./tls/ca.crt"
    env["FORWARD_CA_FILE"] = str(pki.ca.cert)
    done = check(config_path, env)
    assert done.returncode == 0, done.stderr
    with pytest.raises(KeyError, match="set FORWARD_SHARED_KEY"):
        _interpolate(forwarder["environment"]["FORWARD_SHARED_KEY"], {})

    # forwarder ships to the fluent-bit service, on the port its forward input listens on
    cfg = load_config(config_path, env=env)
    (server,) = cfg.output.servers
    assert (server.endpoint.scheme, server.endpoint.host) == ("tls", "fluent-bit")
    fb_conf = (EXAMPLES / "fluent-bit" / "fluent-bit.conf").read_text()
    (port,) = re.findall(r"^\s+Port\s+(\d+)$", fb_conf, re.M)
    assert server.endpoint.port == int(port)
    assert str(port) in [str(p) for p in fluent_bit["expose"]]
    fb_volumes = mounts(fluent_bit)
    assert fb_volumes["/fluent-bit/etc/fluent-bit.conf"] == ("./fluent-bit/fluent-bit.conf", True)
    for target in re.findall(r"tls\.(?:crt|key)_file\s+(\S+)", fb_conf):
        assert target in fb_volumes, target
    key = forwarder["environment"]["FORWARD_SHARED_KEY"]
    assert fluent_bit["environment"]["FORWARD_SHARED_KEY"] == key

    # the health check asks /healthz where the config's listener is
    test = " ".join(forwarder["healthcheck"]["test"])
    _, _, listen_port = cfg.service.http_listen.rpartition(":")
    assert f"http://127.0.0.1:{listen_port}/healthz" in test
    assert forwarder["healthcheck"]["test"][0] == "CMD"
