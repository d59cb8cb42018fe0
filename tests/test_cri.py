"""The CRI log format parser and the kubelet's names, on files conmon (podman) wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.docker.frames import PartialJoiner
from forwarder.kubernetes.cri import CriParser
from forwarder.kubernetes.metadata import DEFAULT_TAG, compile_tag, record_maker
from forwarder.kubernetes.pods import (
    Finish,
    Follow,
    Forget,
    Listing,
    LogKey,
    PodsTable,
    link_target,
    log_key,
    pod_log,
)
from forwarder.kubernetes.source import CriNaming
from forwarder.records import ContainerId, LogLine
from forwarder.tail import FileRef, chain_of

DATA = Path(__file__).parent / "data" / "cri"
CID = ContainerId("ab" * 32)


def parse_all(data: bytes, step: int) -> tuple[list[LogLine], int]:
    parser = CriParser()
    joiner = PartialJoiner(1 << 20, piece_bytes=0)
    out: list[LogLine] = []
    end = 0
    for i in range(0, len(data), step):
        chunk = parser.feed(data[i : i + step])
        assert not chunk.garbled
        out += joiner.feed(chunk.lines)
        end = chunk.end_offset
    return out, end


@pytest.mark.parametrize("step", [1, 7, 100, 8192, 1 << 20])
def test_interleaved_partials_join_per_stream_at_any_cut(step: int) -> None:
    # conmon: "out-a " and "out-b " are P pieces of one stdout line, stderr lines land
    # between them, and the last write "last" is a P with no F after it.
    data = (DATA / "conmon-interleaved.log").read_bytes()
    lines, end = parse_all(data, step)
    assert [(line.source, line.text) for line in lines] == [
        ("stdout", "out-a out-b out-c"),
        ("stderr", "err-1"),
        ("stderr", "err-2"),
    ]
    # The joined line carries its first piece's time (the file's nanoseconds, +00:00).
    assert lines[0].ts_ns == 1_795_999_229_831_456_059
    assert end == len(data)  # every entry is complete; "last" waits in the joiner


def test_unfinished_last_piece_is_not_a_line_until_the_stream_ends() -> None:
    data = (DATA / "conmon-interleaved.log").read_bytes()
    parser = CriParser()
    joiner = PartialJoiner(1 << 20, piece_bytes=0)
    joiner.feed(parser.feed(data).lines)
    assert joiner.pending_bytes > 0
    assert [line.text for line in joiner.flush()] == ["last"]


def test_long_line_of_8k_pieces_and_empty_and_utf8_lines() -> None:
    data = (DATA / "conmon-long-line.log").read_bytes()
    lines, _ = parse_all(data, 4096)
    texts = [(line.source, line.text) for line in lines]
    assert texts[0] == ("stdout", "first")
    assert texts[1:41] == [("stderr", f"err {i}") for i in range(40)]
    assert texts[41] == ("stdout", "x" * 20000)
    assert texts[42:] == [("stdout", ""), ("stdout", "é ünï")]


def test_garbled_lines_are_reported_with_their_offset_and_skipped() -> None:
    good = b"2026-11-30T00:40:26.367916077+00:00 stdout F ok\n"
    data = good + b"not a cri line\n" + b"2026-11-30T00:40:26Z stdbad F x\n" + good
    chunk = CriParser(100).feed(data)
    assert [line.data for line in chunk.lines] == [b"ok", b"ok"]
    assert [(g.offset, g.reason) for g in chunk.garbled] == [
        (100 + len(good), "stream is not stdout or stderr"),
        (100 + len(good) + 15, "stream is not stdout or stderr"),
    ]
    assert chunk.end_offset == 100 + len(data)


def test_offset_stops_before_an_incomplete_entry() -> None:
    parser = CriParser()
    chunk = parser.feed(b"2026-11-30T00:40:26Z stdout F a\n2026-11-30T00:40:2")
    assert chunk.end_offset == 32
    assert parser.flush().garbled[0].offset == 32


def test_kubelet_rotation_names_order_the_chain() -> None:
    naming = CriNaming("0.log")
    entries = [
        (name, FileRef(1, i, None), 10)
        for i, name in enumerate(
            [
                "0.log",
                "0.log.20260101-120001",
                "0.log.20260101-120000.gz",
                "0.log.20260101-120002.tmp",
                "1.log",
            ]
        )
    ]
    chain = [f.name for f in chain_of(entries, naming)]
    assert chain == ["0.log.20260101-120000.gz", "0.log.20260101-120001", "0.log"]


def test_link_names_give_the_container_id() -> None:
    name = f"web-0_shop_nginx-{CID}.log"
    found = link_target(name, "/var/log/pods/shop_web-0_1234-uid/nginx/2.log")
    assert found == (LogKey("shop_web-0_1234-uid", "nginx", 2), CID)
    assert link_target("garbage.log", "/x/y/z") is None
    assert log_key("shop_web-0_uid", "nginx", "0.log.20260101-120000.gz") == LogKey(
        "shop_web-0_uid", "nginx", 0
    )


def test_default_tag_and_record_are_those_of_the_fluentd_daemonset() -> None:
    log = pod_log(LogKey("shop_web-0_1234-uid", "nginx", 2), CID)
    assert compile_tag(DEFAULT_TAG)(log) == (
        f"kubernetes.var.log.containers.web-0_shop_nginx-{CID}.log"
    )
    assert record_maker(log)(LogLine("stderr", 5, "hi")) == {
        "stream": "stderr",
        "logtag": "F",
        "log": "hi",
        "kubernetes": {
            "namespace_name": "shop",
            "pod_name": "web-0",
            "pod_id": "1234-uid",
            "container_name": "nginx",
            "container_id": CID,
            "restart_count": 2,
        },
    }


def test_table_follows_when_linked_finishes_on_restart_forgets_when_gone() -> None:
    table = PodsTable()
    k0 = LogKey("ns_pod_uid", "c", 0)
    k1 = LogKey("ns_pod_uid", "c", 1)
    cid1 = ContainerId("cd" * 32)
    assert table.update(Listing(frozenset({k0}), {})) == []
    assert table.waiting_for_id == {k0}
    [follow] = table.update(Listing(frozenset({k0}), {k0: CID}))
    assert isinstance(follow, Follow)
    assert follow.log.container_id == CID
    assert table.update(Listing(frozenset({k0}), {k0: CID})) == []
    actions = table.update(Listing(frozenset({k0, k1}), {k0: CID, k1: cid1}))
    assert actions == [Finish(k0), Follow(k1, pod_log(k1, cid1))]
    assert table.ended(k0, failed=False, present=True) == []
    assert table.update(Listing(frozenset({k1}), {k1: cid1})) == [Forget(CID)]
    # A failed follower is followed again by the next look.
    assert table.ended(k1, failed=True, present=True) == []
    assert table.update(Listing(frozenset({k1}), {k1: cid1})) == [Follow(k1, pod_log(k1, cid1))]
