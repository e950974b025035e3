"""Fixtures of the chaos suite: one fleet for the module (its start is the expensive part), and the
report every scenario appends to. Run with `make chaos` (`pytest -m chaos tests/chaos -s`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.fleet import Fleet, answer, start_fleet
from tests.chaos.report import ChaosReport
from tests.gateway.stack import wait_until
from tests.support.servers import PostgresServer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Fleet]:
    started = start_fleet(tmp_path_factory.mktemp("chaos"), postgres_server)
    try:
        # The load's key was made on gateway 0; gateway 1 learns it from the registry's feed.
        wait_until(lambda: all(answer(a, started.token) == "OK" for a in started.gateway_addresses),
                   timeout=60, interval=0.2)
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def chaos_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosReport]:
    configured = os.environ.get("AIAAS_CHAOS_REPORT")
    report = ChaosReport(Path(configured) if configured else tmp_path_factory.getbasetemp() / "chaos-report.md")
    yield report
    print(f"\n[chaos] report: {report.path} (and {report.json_path.name})", flush=True)
