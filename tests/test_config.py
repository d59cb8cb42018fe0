"""What a user sees from `forwarder check`: exit codes and messages naming the key or line."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from forwarder.config import ConfigError, Environment, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "forwarder.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_shipped_config_is_valid_and_equals_the_defaults() -> None:
    shipped = load_config(ROOT / "conf" / "forwarder.toml", env={})
    defaults = load_config(None, env={})
    assert shipped.model_dump(exclude={"output": {"self_hostname"}, "docker": {"host"}}) == (
        defaults.model_dump(exclude={"output": {"self_hostname"}, "docker": {"host"}})
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[output]\nflush_intreval = "1s"\n', "output.flush_intreval: unknown key"),
        ("[outptu]\n", "outptu: unknown key"),
        ("[output.tls]\nverfy = true\n", "output.tls.verfy: unknown key"),
        ('[output]\nservers = ["http://x:1"]\n', "output.servers.0.url"),
        ('[output]\nservers = ["tcp://x"]\n', "is not tcp://host:port"),
        ('[output]\nservers = [{ url = "tcp://a:1", wieght = 3 }]\n', "output.servers.0.wieght"),
        ('[output]\nflush_interval = "soon"\n', "output.flush_interval"),
        ('[output]\nchunk_limit = "1 parsec"\n', "output.chunk_limit"),
        ('[output]\nrequire_ack = "maybe"\n', "output.require_ack"),
        ('[docker]\nread_from = "middle"\n', "docker.read_from"),
        ('[tags]\nlogs = "{{.Nmae}}"\n', "tags.logs"),
        ("[output\n", "line 1"),
        ('[docker]\nhost = "x"\nhost = "y"\n', "line 3"),
    ],
)
def test_check_names_the_key_or_line(tmp_path: Path, text: str, expected: str) -> None:
    result = check(tmp_path, text)
    assert result.returncode == 2, result
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    result = check(tmp_path, '[output]\nservers = ["unix:///run/fluent.sock", "tls://a:24224"]\n')
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_units_are_parsed() -> None:
    cfg = config_from_dict(
        {"output": {"flush_interval": "250ms", "chunk_limit": "512KiB", "ack_timeout": 2}},
        env={},
    )
    assert cfg.output.flush_interval == timedelta(milliseconds=250)
    assert cfg.output.chunk_limit == 512 * 1024
    assert cfg.output.ack_timeout == timedelta(seconds=2)


def test_environment_substitution_and_unset_variable() -> None:
    cfg = config_from_dict(
        {"output": {"shared_key": "${KEY}", "username": "$${x}"}}, env={"KEY": "s3cret"}
    )
    assert cfg.output.shared_key == "s3cret"
    assert cfg.output.username == "${x}"
    with pytest.raises(ConfigError, match=r"output.shared_key: environment variable NOPE"):
        config_from_dict({"output": {"shared_key": "${NOPE}"}}, env={})


def test_secret_values_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"output": {"shared_key": 12345}}, env={})
    assert "12345" not in str(info.value)


def test_secret_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n")
    cfg = config_from_dict({"output": {"shared_key_file": str(tmp_path / "key")}}, env={})
    assert cfg.output.secret_shared_key() == "from-file"


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("forwarder ")


def test_the_kubernetes_example_config_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "conf" / "kubernetes" / "daemonset.yaml").read_text()
    embedded = text.split("forwarder.toml: |\n", 1)[1].split("---", 1)[0]
    toml = "\n".join(line[4:] for line in embedded.splitlines())
    path = tmp_path / "daemonset.toml"
    path.write_text(toml)
    cfg = load_config(path, env={"FORWARD_SHARED_KEY": "k", "NODE_NAME": "node-1"})
    assert cfg.output.shared_key == "k"
    assert cfg.output.self_hostname == "node-1"
    assert [s.weight for s in cfg.output.servers] == [60, 60]


def test_environment_reads_docker_tls_verify_and_the_self_container_override() -> None:
    assert Environment.read({}) == Environment(docker_tls_verify=False, self_container_id=None)
    env = {"DOCKER_TLS_VERIFY": "1", "FORWARDER_SELF_CONTAINER_ID": "ab" * 32}
    assert Environment.read(env) == Environment(docker_tls_verify=True, self_container_id="ab" * 32)
    # Only "1" turns TLS on (as aiodocker reads it); an empty override is none.
    assert Environment.read({"DOCKER_TLS_VERIFY": "true", "FORWARDER_SELF_CONTAINER_ID": ""}) == (
        Environment()
    )
