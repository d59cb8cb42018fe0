"""Helpers the unit tests share: one of each, so that every test file means the same by them."""

from __future__ import annotations

from collections.abc import Callable


def feed_all(feed: Callable[[bytes], object], *pieces: bytes) -> None:
    """Pass ``pieces`` to ``feed`` in order: under ``pytest.raises``, the error may come from
    whichever piece completes what is wrong."""
    for piece in pieces:
        feed(piece)
