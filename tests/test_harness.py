"""The engine fixture gives a real, working Docker engine (these tests need no forwarder)."""

from __future__ import annotations

import struct

import pytest

from tests.harness.engine import REQUIRED_APPLETS, Engine, EngineError, ping


def demultiplex(body: bytes) -> list[tuple[int, bytes]]:
    """(stream, payload) frames of a non-TTY logs body: 1-byte stream, 3 zero bytes, u32 size."""
    frames: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(body):
        stream, size = struct.unpack_from(">B3xI", body, offset)
        offset += 8
        frames.append((stream, body[offset : offset + size]))
        offset += size
    assert offset == len(body), "the last frame is cut short"
    return frames


def test_container_output_is_visible_through_docker_logs(engine: Engine) -> None:
    cid = engine.run("sh", "-c", "echo hello-out; echo hello-err >&2; exit 3")
    assert engine.wait_exited(cid) == 3

    logs = engine.docker("logs", cid)
    assert logs.stdout == "hello-out\n"
    assert logs.stderr == "hello-err\n"

    frames = demultiplex(engine.logs_api_bytes(cid))
    assert sorted(frames) == [(1, b"hello-out\n"), (2, b"hello-err\n")]

    stamped = demultiplex(engine.logs_api_bytes(cid, stdout=True, stderr=False, timestamps=True))
    assert len(stamped) == 1
    timestamp, _, line = stamped[0][1].partition(b" ")
    assert line == b"hello-out\n"
    assert timestamp.endswith(b"Z")
    assert b"T" in timestamp


def test_tty_logs_are_raw(engine: Engine) -> None:
    cid = engine.run("printf", "a-tty-line\\n", tty=True)
    engine.wait_exited(cid)
    assert engine.logs_api_bytes(cid) == b"a-tty-line\r\n"


def test_test_image_has_the_applets_tests_rely_on(engine: Engine) -> None:
    check = "for a in " + " ".join(REQUIRED_APPLETS) + '; do [ -x "/bin/$a" ] || echo "no $a"; done'
    pipeline = "seq 5 | head -n 3 | tr 0-9 a-j | wc -l; yes | head -c 4 | dd 2>/dev/null | wc -c"
    result = engine.docker(
        "run", "--rm", "--network", "none", engine.image, "sh", "-c", f"{check}; {pipeline}"
    )
    assert result.stdout.split() == ["3", "4"]


def test_run_labels_and_tracks_containers_and_rm_removes_them(engine: Engine) -> None:
    cid = engine.run("true", name="fwd-harness-named", labels={"app": "demo"})
    info = engine.inspect(cid)
    assert info["Name"] == "/fwd-harness-named"
    assert info["Config"]["Labels"] == {"forwarder-test": "1", "app": "demo"}
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert cid in engine.created

    engine.rm(cid)
    assert cid not in engine.created
    with pytest.raises(EngineError, match="HTTP 404"):
        engine.inspect(cid)
    engine.rm(cid)  # removing it again is fine


def test_docker_failure_raises_with_output(engine: Engine) -> None:
    with pytest.raises(EngineError, match="No such container"):
        engine.docker("logs", "does-not-exist")
    assert engine.docker("logs", "does-not-exist", check=False).returncode != 0


def test_stop_and_start_the_same_daemon(engine: Engine) -> None:
    before = engine.run("echo", "before-restart")
    engine.wait_exited(before)

    engine.stop_daemon()  # skips on an external DOCKER_HOST
    assert not engine.daemon_running
    assert not ping(engine.host)

    engine.start_daemon()
    assert engine.daemon_running
    assert ping(engine.host)

    # Same data-root: the old container and its logs survived the restart ...
    assert engine.docker("logs", before).stdout == "before-restart\n"
    # ... and the engine still runs new containers.
    after = engine.run("echo", "after-restart")
    assert engine.wait_exited(after) == 0
    assert engine.docker("logs", after).stdout == "after-restart\n"


def test_stop_daemon_stops_running_containers(engine: Engine) -> None:
    cid = engine.run("sh", "-c", "echo up; while true; do sleep 1; done")
    engine.stop_daemon()
    engine.start_daemon()
    state = engine.inspect(cid)["State"]
    assert state["Running"] is False
    assert state["Status"] == "exited"
