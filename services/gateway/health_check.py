"""Active health checks of the inference replicas: `grpc.health.v1.Health/Check` for service ""
(the server as a whole, SERVING once its start-up loads are done, NOT_SERVING while it drains) on
each replica's own channel, every `interval_s` give or take `jitter`, one task per replica.

Verdicts go to the balancer's ejection state (see balancer.py): SERVING brings a replica seen down
back at once; a transport failure or a check with no answer within `timeout_s` counts as a
transport failure; NOT_SERVING (or an unknown service) ejects at once. Any other status is an
answer from a live but busy server (RESOURCE_EXHAUSTED at its concurrency cap, say) and changes
nothing. A replica without the health service (UNIMPLEMENTED) is not checked again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from services.gateway.balancer import Balancer, Replica

log = logging.getLogger("aiaas.gateway.health")

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_REQUEST = health_pb2.HealthCheckRequest(service="")
_SERVING = health_pb2.HealthCheckResponse.SERVING
# Codes of a check that never reached the server's answer.
_NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def health_check_callable(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(HEALTH_CHECK_METHOD, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)


class HealthChecker:
    """Checks every watched replica until it is forgotten or the checker is closed. A replica's
    `transport` gives `health_check` (the method callable) and `unreachable()` (channel state)."""

    def __init__(self, balancer: Balancer, *, interval_s: float, timeout_s: float, jitter: float = 0.2,
                 rng: Callable[[], float] = random.random) -> None:
        self.balancer = balancer
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.jitter = jitter
        self._rng = rng
        self._tasks: dict[Replica, asyncio.Task[None]] = {}

    def watch(self, replica: Replica) -> None:
        if replica not in self._tasks:
            self._tasks[replica] = asyncio.get_running_loop().create_task(
                self._check_forever(replica), name=f"gateway-health-{replica.address}")

    def forget(self, replica: Replica) -> None:
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def watching(self, replica: Replica) -> bool:
        task = self._tasks.get(replica)
        return task is not None and not task.done()

    async def _check_forever(self, replica: Replica) -> None:
        await asyncio.sleep(self.interval_s * self._rng())  # spreads the replicas' checks apart
        while await self.check(replica):
            await asyncio.sleep(self.interval_s * (1.0 + self.jitter * (2.0 * self._rng() - 1.0)))

    async def check(self, replica: Replica) -> bool:
        """One check and its verdict; False when the replica has no health service to check."""
        transport = replica.transport
        try:
            reply = await transport.health_check(_REQUEST, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            return self._no_verdict(replica, exc)
        if reply.status == _SERVING:
            if self.balancer.check_passed(replica):
                log.info("inference replica %s is SERVING again: it takes traffic", replica.address)
        else:
            self._failed(replica, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), not_serving=True)
        return True

    def _no_verdict(self, replica: Replica, exc: grpc.aio.AioRpcError) -> bool:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.warning("inference replica %s has no grpc.health.v1 service: not health-checked", replica.address)
            return False
        if code in _NO_ANSWER:
            self._failed(replica, code.name, unreachable=replica.transport.unreachable())
        elif code == grpc.StatusCode.NOT_FOUND:
            self._failed(replica, "service unknown", not_serving=True)
        return True

    def _failed(self, replica: Replica, why: str, *, unreachable: bool = False, not_serving: bool = False) -> None:
        if not replica.down:
            log.warning("health check of inference replica %s failed (%s)", replica.address, why)
        self.balancer.check_failed(replica, unreachable=unreachable, not_serving=not_serving)
