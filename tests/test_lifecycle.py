"""Engine events to lifecycle records, on events recorded from a real engine."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from forwarder.docker.lifecycle import LIFECYCLE_ACTIONS, event_container, lifecycle_record
from forwarder.records import ContainerInfo, LifecycleEvent

RECORDING = Path(__file__).parent / "data" / "events" / "engine-20.10.jsonl"
IMAGE = "forwarder-test/busybox:latest"


def recorded() -> list[dict[str, Any]]:
    return [json.loads(line) for line in RECORDING.read_text().splitlines() if line.strip()]


def shipped() -> list[tuple[dict[str, Any], int, LifecycleEvent]]:
    out = []
    for event in recorded():
        entry = lifecycle_record(event, None)
        if entry is not None:
            out.append((event, *entry))
    return out


def named(name: str, action: str) -> list[LifecycleEvent]:
    return [
        record
        for _, _, record in shipped()
        if record.container_name == name and record.action == action
    ]


def test_the_recording_holds_every_action() -> None:
    actions = {str(e["Action"]).partition(":")[0] for e in recorded() if e["Type"] == "container"}
    assert actions >= LIFECYCLE_ACTIONS


def test_shipped_actions_are_exactly_the_lifecycle_ones() -> None:
    container_events = [e for e in recorded() if e["Type"] == "container"]
    expected = [e for e in container_events if e["Action"].partition(":")[0] in LIFECYCLE_ACTIONS]
    assert [event for event, _, _ in shipped()] == expected
    ignored = Counter(e["Action"].partition(":")[0] for e in container_events if e not in expected)
    assert set(ignored) == {"exec_create", "exec_start", "exec_die", "rename", "attach"}


def test_network_events_are_ignored_though_they_name_a_container() -> None:
    network = [e for e in recorded() if e["Type"] == "network"]
    assert network
    for event in network:
        assert lifecycle_record(event, None) is None
        assert event_container(event, None) is None


def test_every_record_validates_and_carries_the_events_time() -> None:
    for event, ts_ns, record in shipped():
        assert ts_ns == event["timeNano"]
        assert record.container_id == event["id"]
        assert record.container_name == "/" + event["Actor"]["Attributes"]["name"]
        assert record.image == IMAGE
        LifecycleEvent.model_validate(record.record())


def test_die_carries_the_exit_code() -> None:
    assert [r.exit_code for r in named("/ev-exit3", "die")] == [3]
    assert [r.exit_code for r in named("/ev-oom", "die")] == [137]
    assert [r.exit_code for r in named("/ev-rm", "die")] == [0]
    # exit_code belongs to die alone.
    assert all(r.exit_code is None for _, _, r in shipped() if r.action != "die")


def test_kill_carries_the_signal_number() -> None:
    assert [r.signal for r in named("/ev-kill", "kill")] == [10, 9]
    assert [r.signal for r in named("/ev-stop", "kill")] == [15, 9]
    assert all(r.signal is None for _, _, r in shipped() if r.action != "kill")


def test_health_status_carries_the_status() -> None:
    assert {r.health_status for r in named("/ev-health", "health_status")} == {"healthy"}
    assert {r.health_status for r in named("/ev-unhealthy", "health_status")} == {"unhealthy"}
    assert all(r.health_status is None for _, _, r in shipped() if r.action != "health_status")


def test_a_records_keys() -> None:
    (die,) = named("/ev-exit3", "die")
    assert die.record() == {
        "action": "die",
        "container_id": die.container_id,
        "container_name": "/ev-exit3",
        "image": IMAGE,
        "exit_code": 3,
    }


def test_oom_pause_restart_and_the_rest() -> None:
    assert len(named("/ev-oom", "oom")) == 3
    for action in ("stop", "restart", "pause", "unpause", "create", "start"):
        assert len(named("/ev-stop", action)) == (2 if action == "start" else 1), action
    # Renamed to ev-stop2 before it was destroyed: the event has the new name.
    assert len(named("/ev-stop2", "destroy")) == 1


def test_a_known_container_gives_name_and_image() -> None:
    event = next(e for e in recorded() if e.get("Action") == "die" and e["id"].startswith("4ef2"))
    known = ContainerInfo(id=event["id"], name="/known-name", image="img:known")
    entry = lifecycle_record(event, known)
    assert entry is not None
    assert (entry[1].container_name, entry[1].image) == ("/known-name", "img:known")
    assert event_container(event, known) is known


def test_a_gone_container_is_built_from_the_attributes_labels_included() -> None:
    event = next(
        e for e in recorded() if e.get("Action") == "destroy" and "app" in e["Actor"]["Attributes"]
    )
    container = event_container(event, None)
    assert container is not None
    assert container.id == event["id"]
    assert container.name == "/ev-labelled"
    assert container.image == IMAGE
    assert container.labels == {"app": "web", "forwarder.exclude": "true"}


def test_another_containers_info_is_a_mistake() -> None:
    event = recorded()[0]
    other = ContainerInfo(id="f" * 64, name="/other")
    with pytest.raises(ValueError, match="given with"):
        lifecycle_record(event, other)


def base_event() -> dict[str, Any]:
    return copy.deepcopy(next(e for e in recorded() if e.get("Action") == "die"))


def test_missing_attributes() -> None:
    event = base_event()
    del event["Actor"]["Attributes"]
    entry = lifecycle_record(event, None)
    assert entry is not None
    record = entry[1]
    assert record.container_name == "/" + event["id"][:12]
    assert record.image == IMAGE  # from the event's "from"
    assert record.exit_code is None

    del event["from"]
    event["Actor"] = None
    entry = lifecycle_record(event, None)
    assert entry is not None
    assert entry[1].image == ""


def test_malformed_numbers_are_left_out() -> None:
    event = base_event()
    event["Actor"]["Attributes"]["exitCode"] = "three"
    entry = lifecycle_record(event, None)
    assert entry is not None
    assert entry[1].exit_code is None
    kill = copy.deepcopy(event)
    kill["Action"] = kill["status"] = "kill"
    kill["Actor"]["Attributes"]["signal"] = "SIGKILL"
    entry = lifecycle_record(kill, None)
    assert entry is not None
    assert entry[1].signal is None


def test_health_status_without_a_status() -> None:
    event = base_event()
    event["Action"] = event["status"] = "health_status"
    entry = lifecycle_record(event, None)
    assert entry is not None
    assert (entry[1].action, entry[1].health_status) == ("health_status", None)


def test_time_falls_back_to_seconds_and_an_event_without_one_is_dropped() -> None:
    event = base_event()
    del event["timeNano"]
    entry = lifecycle_record(event, None)
    assert entry is not None
    assert entry[0] == event["time"] * 1_000_000_000
    del event["time"]
    assert lifecycle_record(event, None) is None


@pytest.mark.parametrize(
    "change",
    [
        {"Type": "image"},
        {"Type": "network"},
        {"id": "not-a-container-id", "Actor": {"ID": "nope", "Attributes": {}}},
        {"Action": "exec_start: sh", "status": "exec_start: sh"},
        {"Action": "rename", "status": "rename"},
        {"Action": "", "status": ""},
        {"Action": 7, "status": 7},
    ],
)
def test_not_shipped(change: dict[str, Any]) -> None:
    event = base_event()
    event.update(change)
    assert lifecycle_record(event, None) is None


def test_id_from_the_actor_when_the_legacy_id_is_absent() -> None:
    event = base_event()
    cid = event.pop("id")
    entry = lifecycle_record(event, None)
    assert entry is not None
    assert entry[1].container_id == cid
