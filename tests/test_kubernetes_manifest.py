"""conf/kubernetes/daemonset-cri.yaml, checked structurally (parsed, its config loaded)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder.config import ConfigError, load_config

MANIFEST = Path(__file__).resolve().parent.parent / "conf" / "kubernetes" / "daemonset-cri.yaml"


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return doc


def load_text(text: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forwarder.toml"
        path.write_text(text)
        return load_config(path, env={"FORWARD_SHARED_KEY": "k", "NODE_NAME": "node-1"})


def test_every_document_has_api_version_kind_and_name() -> None:
    for doc in docs():
        assert doc["apiVersion"]
        assert doc["kind"]
        assert doc["metadata"]["name"]
    kinds = [d["kind"] for d in docs()]
    assert kinds[0] == "Namespace"
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"} <= set(kinds)


def test_the_role_grants_get_list_watch_on_pods_and_namespaces_only() -> None:
    (rule,) = one("ClusterRole")["rules"]
    assert rule == {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": [
        "get", "list", "watch"]}  # fmt: skip
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one("ClusterRole")["metadata"]["name"]
    (subject,) = binding["subjects"]
    account = one("ServiceAccount")
    assert (subject["name"], subject["namespace"]) == (
        account["metadata"]["name"],
        account["metadata"]["namespace"],
    )


def test_the_daemonset_mounts_the_log_dirs_read_only_and_its_config_matches() -> None:
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/log/pods", "/var/log/containers"):
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    node_name = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name[0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    config = load_text(one("ConfigMap")["data"]["forwarder.toml"])
    assert not config.docker.enabled
    assert config.kubernetes.enabled
    assert config.kubernetes.node_name == "node-1"
    assert config.state.dir.as_posix() in mounts
    port = int(config.service.http_listen.rpartition(":")[2])
    (declared,) = container["ports"]
    assert declared["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_metadata_api_is_refused_with_a_sentence_until_it_exists() -> None:
    with pytest.raises(ConfigError, match=r'metadata = "api".*not implemented yet'):
        load_text('[kubernetes]\nenabled = true\nmetadata = "api"\n')
