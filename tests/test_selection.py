"""[containers] include/exclude matchers, and the decision table following them."""

from __future__ import annotations

from typing import Any

import pytest

from forwarder.config import ConfigError, ContainerMatcher, ContainersConfig, config_from_dict
from forwarder.docker.containers import ContainerTable, EmitLifecycle, Follow, Skip
from forwarder.records import ContainerId, ContainerInfo
from forwarder.selection import Selection, compile_matcher, image_names

A = ContainerId("aa" * 32)


def info(
    name: str = "/web-1", image: str = "nginx:1.27", labels: dict[str, str] | None = None
) -> ContainerInfo:
    return ContainerInfo(id=A, name=name, image=image, labels=labels or {}, running=True)


def matches(matcher: dict[str, Any], container: ContainerInfo) -> bool:
    return compile_matcher(ContainerMatcher.model_validate(matcher))(container)


@pytest.mark.parametrize(
    ("image", "names"),
    [
        ("nginx", ("nginx",)),
        ("nginx:1.27", ("nginx:1.27", "nginx")),
        ("registry.example:5000/team/app", ("registry.example:5000/team/app",)),
        (
            "registry.example:5000/team/app:v2",
            ("registry.example:5000/team/app:v2", "registry.example:5000/team/app"),
        ),
        ("app@sha256:abcd", ("app@sha256:abcd", "app")),
    ],
)
def test_an_image_is_tried_with_and_without_its_tag(image: str, names: tuple[str, ...]) -> None:
    assert image_names(image) == names


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        ({"name": "web-*"}, True),
        ({"name": "/web-*"}, None),  # refused by the config
        ({"name": "db*"}, False),
        ({"image": "nginx"}, True),
        ({"image": "nginx:1.27"}, True),
        ({"image": "nginx:1.26"}, False),
        ({"image": "ngi*"}, True),
        ({"label": "team"}, True),
        ({"label": "tier"}, False),
        ({"label": "team=pay*"}, True),
        ({"label": "team=ops"}, False),
        ({"label": "empty="}, True),
        ({"compose_project": "shop"}, True),
        ({"compose_service": "db"}, False),
        ({"compose_service": "fr*"}, True),
        ({"name": "web-*", "compose_service": "db"}, False),  # every key must match
        ({"name": "web-*", "image": "nginx"}, True),
    ],
)
def test_each_matcher_kind(matcher: dict[str, Any], expected: bool | None) -> None:
    container = info(
        labels={
            "team": "payments",
            "empty": "",
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "front",
        }
    )
    if expected is None:
        with pytest.raises(ValueError, match="leading"):
            ContainerMatcher.model_validate(matcher)
        return
    assert matches(matcher, container) is expected


def test_a_compose_matcher_does_not_match_a_container_without_the_label() -> None:
    assert not matches({"compose_project": "*"}, info())


@pytest.mark.parametrize(
    ("containers", "message"),
    [
        ({"include": [{"label": "=x"}]}, "containers.include.0.label: expected"),
        ({"include": [{}]}, "containers.include.0: a matcher needs at least one of"),
        ({"exclude": [{"name": "/x"}]}, "containers.exclude.0.name: a name glob is written"),
        ({"exclude": [{"nmae": "x"}]}, "containers.exclude.0.nmae: unknown key"),
        ({"exclude": [{"image": ""}]}, "containers.exclude.0.image: empty"),
        ({"exclude": [{"image": 3}]}, "containers.exclude.0.image: Input should be a valid"),
        ({"include": {"name": "x"}}, "containers.include: Input should be a valid list"),
        ({"stats": "yes"}, "containers.stats: Input should be a valid boolean"),
    ],
)
def test_a_malformed_matcher_is_refused_naming_it(containers: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"containers": containers}, env={})
    assert message in str(caught.value)


def selection(**config: Any) -> Selection:
    return Selection.from_config(ContainersConfig.model_validate(config))


def test_followed_when_an_include_matches_and_no_exclude() -> None:
    chosen = selection(
        include=[{"label": "forwarder.enable=true"}, {"image": "nginx"}],
        exclude=[{"name": "*-debug"}],
    )
    assert chosen.refused(info()) is None
    assert chosen.refused(info(image="redis", labels={"forwarder.enable": "true"})) is None
    assert chosen.refused(info(image="redis")) == "it matches no containers.include matcher"
    assert chosen.refused(info(name="/web-debug")) == (
        "it matches containers.exclude[0] (name='*-debug')"
    )


def test_no_include_follows_everything_not_excluded() -> None:
    assert selection().refused(info()) is None
    assert selection(exclude=[{"image": "busybox*"}]).refused(info(image="busybox:1")) is not None


def table(chosen: Selection, *, lifecycle: bool = True) -> ContainerTable:
    return ContainerTable(
        positions={},
        first_start=False,
        last_run_ns=None,
        read_from_tail=False,
        exclude_label="forwarder.exclude",
        self_id=None,
        selection=chosen,
        lifecycle=lifecycle,
    )


def event(action: str, name: str, image: str, **labels: str) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": action,
        "id": A,
        "timeNano": 1_700_000_000_000_000_000,
        "Actor": {"ID": A, "Attributes": {"name": name, "image": image, **labels}},
    }


def test_the_table_skips_what_the_selection_refuses_and_reports_no_lifecycle() -> None:
    refused = info(name="/web-debug")
    t = table(selection(exclude=[{"name": "*-debug"}]))
    assert t.follow(refused) == [Skip(refused, "it matches containers.exclude[0] (name='*-debug')")]
    actions = t.on_event(event("die", "web-debug", "nginx"))
    assert not [a for a in actions if isinstance(a, EmitLifecycle)]


def test_the_exclude_label_keeps_working_beside_the_selection() -> None:
    labelled = info(labels={"forwarder.exclude": "true"})
    t = table(selection(include=[{"image": "nginx"}]))
    assert t.follow(labelled) == [Skip(labelled, "label forwarder.exclude=true")]


def test_lifecycle_records_follow_the_selection_and_their_switch() -> None:
    chosen = selection(include=[{"compose_service": "front"}])
    front = event("die", "web-1", "nginx", **{"com.docker.compose.service": "front"})
    other = event("die", "web-2", "nginx", **{"com.docker.compose.service": "db"})
    actions = table(chosen).on_event(front)
    assert [type(a) for a in actions if isinstance(a, EmitLifecycle)] == [EmitLifecycle]
    assert not [a for a in table(chosen).on_event(other) if isinstance(a, EmitLifecycle)]
    assert not [
        a for a in table(chosen, lifecycle=False).on_event(front) if isinstance(a, EmitLifecycle)
    ]


def test_a_followed_container_is_followed() -> None:
    t = table(selection(include=[{"name": "web-*"}]))
    assert any(isinstance(a, Follow) for a in t.follow(info()))
