"""services.common.outages: one line when a dependency goes, at most one per interval while it stays
down, one when it answers; errors described on one short line (a real gRPC error included)."""

from __future__ import annotations

import logging

import grpc
import pytest

from aiaas.errors import Unavailable
from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.common.outages import MAX_ERROR_CHARS, OutageLog, describe_error
from tests.support.servers import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tests.outages"]


def test_one_line_per_interval_while_down_and_one_when_back(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(logging.getLogger("tests.outages"), "registry", "10.0.0.1:50051", user="monitor feed",
                       every_s=60, clock=clock)
    caplog.set_level(logging.INFO, logger="tests.outages")
    assert outage.failed(Unavailable("connection refused"), consequence="serving from cache")
    for _ in range(100):  # a retry loop, 0.5 s apart: nothing more for a minute
        clock.now += 0.5
        assert not outage.failed("UNAVAILABLE: connection refused")
    (first,) = _lines(caplog)
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert first.getMessage() == ("monitor feed: registry at 10.0.0.1:50051 unreachable: UNAVAILABLE: connection "
                                  "refused; serving from cache (at most one line per 60 s until it answers)")
    assert (first.dependency, first.address, first.error) == (  # type: ignore[attr-defined]
        "registry", "10.0.0.1:50051", "UNAVAILABLE: connection refused")

    clock.now += 10  # 60 s since the first line
    assert outage.failed("UNAVAILABLE: connection refused")
    assert not outage.failed("UNAVAILABLE: connection refused")
    second = _lines(caplog)[1]
    assert second.getMessage() == ("monitor feed: registry at 10.0.0.1:50051 still unreachable after 60 s and "
                                   "102 failures: UNAVAILABLE: connection refused")
    assert outage.down and outage.failures == 103

    clock.now += 5.5
    assert outage.recovered("resuming after revision 7")
    assert not outage.recovered()  # already up: nothing to say
    back = _lines(caplog)[2]
    assert back.levelno == logging.INFO
    assert back.getMessage() == ("monitor feed: registry at 10.0.0.1:50051 answers again after 65.5 s and "
                                 "103 failures; resuming after revision 7")
    assert not outage.down and outage.failures == 0 and len(_lines(caplog)) == 3

    # The next outage is news at once, however soon it comes.
    clock.now += 1
    assert outage.failed("UNAVAILABLE: gone again")
    assert len(_lines(caplog)) == 4 and outage.outages == 2


def test_tracebacks_only_when_asked_and_only_on_the_lines_logged(clock: Clock,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(logging.getLogger("tests.outages"), "Redis", every_s=1, level=logging.ERROR, clock=clock)
    caplog.set_level(logging.INFO, logger="tests.outages")
    try:
        raise KeyError("bug")
    except KeyError as exc:
        assert outage.failed(exc, exc_info=exc)
        assert not outage.failed(exc, exc_info=exc)
    (line,) = _lines(caplog)
    assert line.levelno == logging.ERROR and line.exc_info is not None
    assert line.getMessage().startswith("Redis unreachable: KeyError: 'bug' (at most one line per 1 s")


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="every_s must be > 0"):
        OutageLog(logging.getLogger("tests.outages"), "Redis", every_s=0)


async def test_a_real_grpc_failure_is_described_on_one_short_line() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rpb_grpc.ModelRegistryStub(channel).GetModel(rpb.GetModelRequest(name="m"), timeout=5)
    text = describe_error(caught.value)
    assert text.startswith("UNAVAILABLE: ") and "\n" not in text and len(text) <= MAX_ERROR_CHARS


def test_descriptions_are_single_bounded_lines() -> None:
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == \
        "ConnectionRefusedError: [Errno 111] Connection refused"
    long = describe_error(RuntimeError("first line\n  second line " + "x" * 500))
    assert long.startswith("RuntimeError: first line second line xxx") and long.endswith("...")
    assert len(long) == MAX_ERROR_CHARS and "\n" not in long
