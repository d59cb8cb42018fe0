"""Selection, extra keys and multiline through `forwarder run` on a real engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from forwarder.docker.frames import Demuxer
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver
from tests.helpers import log_view

MakeCollector = Callable[..., CollectorProcess]


def logs_of(records: list[Any], container_id: str) -> list[str]:
    return [
        r["record"]["log"]
        for r in records
        if r["record"].get("container_id") == container_id and "log" in r["record"]
    ]


def test_extra_keys_match_dockers_fluentd_driver_with_labels_and_env(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
) -> None:
    """One container logged by Docker's fluentd driver with --log-opt labels=a,b,X env=X,Y
    labels-regex env-regex, and read by forwarder with the same keys in [records]: the same
    keys and values (X is both a label and a variable: the variable wins)."""
    ours = make_forward_receiver()
    drivers = make_forward_receiver()
    make_collector(
        ours.address,
        records={
            "labels": ["a", "b", "X", "absent"],
            "env": ["X", "Y", "UNSET"],
            "labels_regex": "^com\\.ex",
            "env_regex": "^APP_",
        },
    )
    port = drivers.address.rsplit(":", 1)[1]
    options = {
        "fluentd-address": f"127.0.0.1:{port}",
        "tag": "docker.{{.Name}}",
        "fluentd-sub-second-precision": "true",
        "labels": "a,b,X,absent",
        "env": "X,Y,UNSET",
        "labels-regex": "^com\\.ex",
        "env-regex": "^APP_",
    }
    args = ["run", "-d", "--name", "drv", "--network", "host", "--log-driver", "fluentd"]
    for key, value in options.items():
        args += ["--log-opt", f"{key}={value}"]
    for label in ("forwarder-test=1", "a=1", "b=two", "X=label", "com.example.team=pay", "c=3"):
        args += ["--label", label]
    for var in ("X=env", "Y=why", "APP_MODE=prod", "OTHER=o"):
        args += ["-e", var]
    cid = engine.docker(
        *args, engine.image, "sh", "-c", "sleep 0.5; echo out; echo err >&2; sleep 600"
    ).stdout.strip()
    theirs = drivers.wait_for(2, timeout=30)
    mine = ours.wait_for(lambda rs: len(logs_of(rs, cid)) >= 2, timeout=30)

    assert log_view(mine, cid) == log_view(theirs, cid)
    record = next(
        r["record"] for r in mine if r["record"].get("container_id") == cid and "log" in r["record"]
    )
    assert {k: record[k] for k in ("a", "b", "X", "Y", "com.example.team", "APP_MODE")} == {
        "a": "1",
        "b": "two",
        "X": "env",
        "Y": "why",
        "com.example.team": "pay",
        "APP_MODE": "prod",
    }


def test_include_and_exclude_matchers_on_a_real_engine(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    """Opt-in by label, by compose service and by image, minus an exclude by name; only the
    followed containers' lifecycle records are shipped; extra keys and a label in the tag."""
    collector = make_collector(
        forward_receiver.address,
        containers={
            "include": [
                {"label": "forwarder.enable=true"},
                {"compose_project": "shop", "compose_service": "front"},
            ],
            "exclude": [{"name": "*-debug"}, {"compose_service": "db"}],
        },
        records={"extra": ["compose_service", "image"]},
        tags={"logs": 'app.{{index .ContainerLabels "com.docker.compose.service"}}.{{.Name}}'},
    )
    script = "echo hello; sleep 600"
    enabled = engine.run("sh", "-c", script, name="enabled", labels={"forwarder.enable": "true"})
    front = engine.run(
        "sh",
        "-c",
        script,
        name="shop-front-1",
        labels={"com.docker.compose.project": "shop", "com.docker.compose.service": "front"},
    )
    db = engine.run(
        "sh",
        "-c",
        script,
        name="shop-db-1",
        labels={
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "db",
            "forwarder.enable": "true",
        },
    )
    debug = engine.run("sh", "-c", script, name="web-debug", labels={"forwarder.enable": "true"})
    plain = engine.run("sh", "-c", script, name="plain")
    records = forward_receiver.wait_for(
        lambda rs: bool(logs_of(rs, enabled) and logs_of(rs, front)), timeout=30
    )
    wait_until(
        lambda: all(name in collector.log() for name in ("/shop-db-1", "/web-debug", "/plain")),
        timeout=30,
        what="a reason logged for each container not followed",
    )
    engine.docker("kill", db, plain, debug, front)
    records = forward_receiver.wait_for(
        lambda rs: any(
            r["record"].get("action") == "die" and r["record"]["container_id"] == front for r in rs
        ),
        timeout=30,
    )
    for cid in (db, debug, plain):
        assert not [r for r in records if r["record"].get("container_id") == cid]
    front_log = next(
        r for r in records if r["record"].get("log") and r["record"]["container_id"] == front
    )
    assert front_log["tag"] == "app.front.shop-front-1"
    assert front_log["record"]["compose_service"] == "front"
    assert front_log["record"]["image"] == engine.image
    log = collector.log()
    assert "container /shop-db-1: not followed (it matches containers.exclude[1]" in log
    assert "container /web-debug: not followed (it matches containers.exclude[0]" in log
    assert "container /plain: not followed (it matches no containers.include matcher)" in log
    assert log.count("/plain: not followed") == 1


def test_a_java_stack_trace_from_a_real_container_is_one_record(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    """The recorded Java trace written to stderr by a container labelled
    forwarder.multiline=java: the trace is one record with the time of its first line; the
    log lines around it stay alone; a stdout line in the middle is not mixed in."""
    trace = (Path(__file__).parent / "data" / "multiline" / "java.log").read_text()
    make_collector(forward_receiver.address)
    cid = engine.run(
        "sh",
        "-c",
        'echo "$TRACE" | head -n 10 >&2; echo between; echo "$TRACE" | tail -n +11 >&2; sleep 600',
        labels={"forwarder.multiline": "java"},
        options=["-e", f"TRACE={trace.rstrip()}"],
    )
    lines = trace.splitlines()
    # The last line waits for what follows it: flush_timeout (1 s) sends it.
    records = forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 5, timeout=30)
    mine = [r for r in records if r["record"].get("container_id") == cid and "log" in r["record"]]
    got = sorted((r["record"]["source"], r["record"]["log"]) for r in mine)
    assert got == sorted(
        [
            ("stderr", lines[0]),
            ("stderr", lines[1]),
            ("stderr", "\n".join(lines[2:19])),
            ("stderr", lines[19]),
            ("stdout", "between"),
        ]
    )
    raw = Demuxer().feed(engine.logs_api_bytes(cid, timestamps=True))
    first_of_trace = next(line.ts_ns for line in raw if line.data.startswith(b"org.spring"))
    joined = next(r for r in mine if r["record"]["log"].startswith("org.spring"))
    assert joined["time_ns"] == first_of_trace
