"""bench.side_by_side: a run of some concurrency levels is as long as the same levels in the full set."""

from __future__ import annotations

from bench.side_by_side import FULL, SHORT, requests_at


def test_requests_follow_the_level_not_its_position() -> None:
    assert [requests_at(c, FULL) for c in (1, 16, 64)] == [300, 2000, 4000]
    assert requests_at(64, FULL) == 4000  # `--concurrency 64` alone
    assert [requests_at(c, SHORT) for c in (1, 8, 32, 128)] == [150, 150, 600, 1200]


def test_tree_cpu_counts_the_children_of_a_server() -> None:
    """A server's CPU is its whole process tree: a child that burns half a second is counted."""
    import subprocess
    import sys

    from bench.lean_client import tree_cpu_seconds

    # The child burns half a second of CPU and then stays (a server's worker between batches).
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(60)\n"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"],
                              start_new_session=True)
    try:
        before = tree_cpu_seconds([parent.pid])
        import time

        deadline = time.monotonic() + 30
        while tree_cpu_seconds([parent.pid]) - before < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_seconds([parent.pid]) - before >= 0.4
        assert tree_cpu_seconds([999_999_999]) == 0.0  # a server that is gone counts nothing
    finally:
        import os
        import signal

        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_the_table_shows_server_cpu_per_request_when_measured() -> None:
    from bench.side_by_side import render

    rows = [{"model": "tiny", "concurrency": 64, "label": label, "rps": rps, "p50_ms": 9.0, "errors": 0,
             "busy_runs": 0, "server_cpu_us": cpu} for label, rps, cpu in
            (("aiaas", 2000.0, 812.4), ("torchserve", 1800.0, None))]
    info = {"started": "2026-12-01 18:00", "finished": "18:10", "cpus": 2.0, "cpu_model": "x", "mode": "short",
            "reps": 1, "torch_threads": 2, "load_before": "0", "load_after": "0", "busy_runs": 0, "runs": 2,
            "max_busy": 0.0, "unavailable": {}, "wrong": {}, "connections": 8, "frontends": 2, "command": "c"}
    table = render(rows, {"aiaas": "aiaas inference", "torchserve": "TorchServe"}, info)
    cpu_table = table.split("Server CPU per answered request", 1)[1]
    assert "| tiny | 64 | 812 | - |" in cpu_table
    assert "| tiny | 64 | 1.11x |" in table  # aiaas / TorchServe
