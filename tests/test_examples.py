"""The deployment examples work as shipped: the image's config, the Kubernetes manifests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder import __version__
from forwarder.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DAEMONSET = ROOT / "conf" / "kubernetes" / "daemonset.yaml"


def check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
    )


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc is not None]


def test_the_image_config_is_the_one_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY conf/docker.toml /etc/forwarder/forwarder.toml" in dockerfile


def test_the_image_config_needs_the_server_and_never_ships_to_itself() -> None:
    """Inside a container 127.0.0.1 is the container: no aggregator is assumed."""
    path = ROOT / "conf" / "docker.toml"
    with pytest.raises(ConfigError, match="FORWARD_SERVER is not set"):
        load_config(path, env={})
    cfg = load_config(path, env={"FORWARD_SERVER": "tcp://fluentd.example:24224"})
    assert [s.url for s in cfg.output.servers] == ["tcp://fluentd.example:24224"]
    assert str(cfg.state.dir) == "/var/lib/forwarder"
    unset = check(path, {})
    assert unset.returncode == 2
    assert "FORWARD_SERVER" in unset.stderr
    assert check(path, {"FORWARD_SERVER": "tcp://fluentd.example:24224"}).returncode == 0


def test_every_kubernetes_manifest_parses_and_defines_what_it_refers_to() -> None:
    docs = manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {
        ("Namespace", "logging"),
        ("Secret", "forwarder"),
        ("ConfigMap", "forwarder"),
        ("DaemonSet", "forwarder"),
    }
    assert [d["kind"] for d in docs][:2] == ["Namespace", "Secret"]  # applied first
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"logging"}
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"forwarder:{__version__.split('+')[0]}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    secret_keys = {
        env["valueFrom"]["secretKeyRef"]["key"]
        for env in container["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret_keys <= set(secret["stringData"])
    config_maps = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert config_maps == {"forwarder"}
    socket = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/docker.sock"]
    assert socket
    assert socket[0]["readOnly"] is True


def test_the_probes_use_the_listener_the_daemonset_config_opens() -> None:
    docs = manifests()
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    listen = load_config_text(config_map["data"]["forwarder.toml"]).service.http_listen
    host, _, port = listen.rpartition(":")
    assert host == "0.0.0.0"  # the kubelet probes the pod's IP, not its loopback
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == int(port)


def test_the_dockerfile_healthcheck_asks_healthz_on_the_default_listener() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (healthcheck,) = [line for line in dockerfile.splitlines() if "urlopen(" in line]
    default = load_config(ROOT / "conf" / "docker.toml", env={"FORWARD_SERVER": "tcp://a:1"})
    assert f"http://{default.service.http_listen}/healthz" in healthcheck
    assert "curl" not in healthcheck  # the slim image has none


def load_config_text(text: str) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forwarder.toml"
        path.write_text(text)
        return load_config(path, env={"FORWARD_SHARED_KEY": "k", "NODE_NAME": "node-1"})


def test_the_daemonset_config_passes_forwarder_check(tmp_path: Path) -> None:
    (config_map,) = [d for d in manifests() if d["kind"] == "ConfigMap"]
    path = tmp_path / "forwarder.toml"
    path.write_text(config_map["data"]["forwarder.toml"])
    env = {"FORWARD_SHARED_KEY": "k", "NODE_NAME": "node-1"}
    done = check(path, env)
    assert done.returncode == 0, done.stderr
    cfg = load_config(path, env=env)
    hosts = [s.endpoint.host for s in cfg.output.servers]
    assert all(re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*\.svc", host) for host in hosts), hosts


def mounts_by_path(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (the host path of its hostPath volume, read-only)."""
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    return {
        m["mountPath"]: (host.get(m["name"], ""), m.get("readOnly", False))
        for m in container["volumeMounts"]
    }


def test_the_daemonset_mounts_what_the_file_source_and_cgroup_stats_read() -> None:
    """Each path the config reads from disk is a read-only mount of the host's: the engine's
    containers/ directory (as the engine reports LogPath: /var/lib/docker/containers), the
    cgroup tree and /proc."""
    docs = manifests()
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    cfg = load_config_text(config_map["data"]["forwarder.toml"])
    mounts = mounts_by_path(pod, container)
    assert cfg.docker.log_source in ("auto", "file")
    containers_dir = cfg.docker.containers_dir or "/var/lib/docker/containers"
    assert mounts[containers_dir] == ("/var/lib/docker/containers", True)
    assert cfg.stats.source in ("auto", "cgroup")
    assert mounts[cfg.stats.cgroup_root] == ("/sys/fs/cgroup", True)
    if cfg.stats.proc_root == "/proc":
        assert pod.get("hostPID") is True, "the host's processes must be visible in /proc"
    else:
        assert mounts[cfg.stats.proc_root] == ("/proc", True)


def test_the_dockerfile_run_example_mounts_the_logs_and_cgroups_read_only() -> None:
    """The image's config leaves containers_dir, cgroup_root and proc_root at their defaults:
    the example mounts the host's paths at the same places, read-only."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    default = load_config(ROOT / "conf" / "docker.toml", env={"FORWARD_SERVER": "tcp://a:1"})
    assert default.docker.log_source == "auto"
    assert default.docker.containers_dir == ""
    assert "-v /var/lib/docker/containers:/var/lib/docker/containers:ro" in dockerfile
    assert f"-v /sys/fs/cgroup:{default.stats.cgroup_root}:ro" in dockerfile
    assert default.stats.proc_root == "/proc"
    assert "--pid=host" in dockerfile
