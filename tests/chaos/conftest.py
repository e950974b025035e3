"""Fixtures of the chaos suite: one fleet for the module (its start is the expensive part), and the
report every scenario appends to. Run with `make chaos` (`pytest -m chaos tests/chaos -s`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.chaos.fleet import MODEL, Fleet, start_fleet
from tests.chaos.load import status_of
from tests.chaos.report import ChaosReport
from tests.gateway.stack import wait_until
from tests.support.servers import PostgresServer


def answer(address: str, token: str) -> str:
    """What the gateway at `address` answers `token` for one request: "OK" or the status name."""
    tensor = tc.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with tc.InferenceServerClient(address) as client:
        try:
            client.infer(MODEL, [tensor], headers={"authorization": f"Bearer {token}"}, client_timeout=5)
        except InferenceServerException as exc:
            return status_of(exc)
    return "OK"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Fleet]:
    started = start_fleet(tmp_path_factory.mktemp("chaos"), postgres_server)
    try:
        # The load's key was made on gateway 0; gateway 1 learns it from the registry's feed.
        for address in started.gateway_addresses:
            wait_until(lambda a=address: answer(a, started.token) == "OK", timeout=60, interval=0.2)  # type: ignore[misc]
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def chaos_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosReport]:
    configured = os.environ.get("AIAAS_CHAOS_REPORT")
    report = ChaosReport(Path(configured) if configured else tmp_path_factory.getbasetemp() / "chaos-report.md")
    yield report
    print(f"\n[chaos] report: {report.path} (and {report.json_path.name})", flush=True)
