"""bench.side_by_side: a run of some concurrency levels is as long as the same levels in the full set."""

from __future__ import annotations

from bench.side_by_side import FULL, SHORT, requests_at


def test_requests_follow_the_level_not_its_position() -> None:
    assert [requests_at(c, FULL) for c in (1, 16, 64)] == [300, 2000, 4000]
    assert requests_at(64, FULL) == 4000  # `--concurrency 64` alone
    assert [requests_at(c, SHORT) for c in (1, 8, 32, 128)] == [150, 150, 600, 1200]
