"""Extra keys on log records: the fluentd driver's labels/env semantics, and richer keys."""

from __future__ import annotations

from typing import Any

import pytest

from forwarder.config import RecordsConfig
from forwarder.metadata import environment, record_extra
from forwarder.records import ContainerInfo
from tests.helpers import CID

CONTAINER = ContainerInfo(
    id=CID,
    name="/web-1",
    image="shop/web:2.1",
    image_id="sha256:" + "ab" * 32,
    labels={
        "com.example.team": "payments",
        "com.example.tier": "front",
        "com.docker.compose.project": "shop",
        "com.docker.compose.service": "web",
        "X": "from-label",
        "other": "o",
    },
    env=("APP_VERSION=1.2", "APP_MODE=prod", "X=from-env", "NOVALUE", "X=last", "PATH=/bin"),
)


def extra(**config: Any) -> dict[str, Any]:
    return record_extra(CONTAINER, RecordsConfig.model_validate(config), host="node-1")


def test_nothing_by_default() -> None:
    assert extra() == {}


def test_environment_keeps_the_last_of_a_name_and_skips_entries_without_a_value() -> None:
    assert environment(CONTAINER) == {
        "APP_VERSION": "1.2",
        "APP_MODE": "prod",
        "X": "last",
        "PATH": "/bin",
    }


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"labels": ["com.example.team", "missing"]}, {"com.example.team": "payments"}),
        (
            {"labels_regex": r"^com\.example\."},
            {"com.example.team": "payments", "com.example.tier": "front"},
        ),
        ({"env": ["APP_VERSION", "NOVALUE"]}, {"APP_VERSION": "1.2"}),
        ({"env_regex": "^APP_"}, {"APP_VERSION": "1.2", "APP_MODE": "prod"}),
        ({"env_regex": "MODE"}, {"APP_MODE": "prod"}),  # found anywhere, as Go's MatchString
        # A variable wins over a label of the same key (the driver adds it later).
        ({"labels": ["X"], "env": ["X"]}, {"X": "last"}),
        ({"labels": ["X"]}, {"X": "from-label"}),
    ],
)
def test_driver_keys(config: dict[str, Any], expected: dict[str, str]) -> None:
    assert extra(**config) == expected


def test_richer_keys_and_the_docker_map() -> None:
    assert extra(extra=["image", "compose_service", "host"]) == {
        "image": "shop/web:2.1",
        "compose_service": "web",
        "host": "node-1",
    }
    assert extra(extra=["docker"]) == {
        "docker": {
            "image": "shop/web:2.1",
            "image_id": "sha256:" + "ab" * 32,
            "compose_project": "shop",
            "compose_service": "web",
            "host": "node-1",
        }
    }


def test_compose_keys_are_left_out_for_a_container_without_compose_labels() -> None:
    bare = ContainerInfo(id=CID, name="/x", image="busybox")
    config = RecordsConfig(extra=["compose_project", "image"])
    assert record_extra(bare, config) == {"image": "busybox"}


def test_a_driver_key_is_set_over_a_richer_one() -> None:
    assert extra(extra=["image"], labels=["image"]) == {"image": "shop/web:2.1"}
    labelled = CONTAINER.model_copy(update={"labels": {"image": "from-label"}})
    config = RecordsConfig(extra=["image"], labels=["image"])
    assert record_extra(labelled, config) == {"image": "from-label"}


def test_the_environment_stays_out_of_a_containers_repr() -> None:
    assert "APP_VERSION" not in repr(CONTAINER)
