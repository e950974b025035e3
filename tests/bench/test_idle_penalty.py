"""bench.bench_idle_penalty: every cell is measured (a positive time), hot first, with the ratio."""

from __future__ import annotations

import re

import pytest

from bench import bench_idle_penalty


def test_the_table_has_a_measured_row_per_kind_of_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_idle_penalty.main(["--n", "5"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line
            and not line.startswith("| work")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| tiny MLP forward, gap slept", "| tiny MLP forward, gap spun",
        "| grpc.aio echo round trip (one process), gap slept"]
    for row in rows:
        cells = row.strip("| ").split(" | ")[1:]
        times = [float(cell.replace(",", "")) for cell in cells[:4]]
        assert all(t > 0 for t in times)
        assert re.fullmatch(r"\d+\.\dx", cells[4])


def test_a_slept_gap_waits_and_a_spun_one_burns_the_cpu() -> None:
    import time

    for spin in (False, True):
        wall, cpu = time.perf_counter(), time.process_time()
        bench_idle_penalty._wait(0.05, spin)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert wall >= 0.05
        assert (cpu > 0.03) == spin
