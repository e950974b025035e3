"""The inference replicas behind the gateway: grpc.aio channels, DNS discovery, forwarding of raw
request bytes with deadline propagation, and a retry on another replica for UNAVAILABLE.

A failed call is one of two kinds. An *application answer* carries the `aiaas-app-status` trailer
that every service's own errors carry (`services.common.interceptors.APP_STATUS_KEY`): the replica
is up. UNAVAILABLE (model loading, queue timeout, worker restarting) and RESOURCE_EXHAUSTED (queue
full) of that kind go to another replica when one is left to try and are passed through as they
are otherwise; they never count against the replica. A *replica failure* is UNAVAILABLE without
the trailer (grpc's own: connection refused or reset, GOAWAY) or a deadline that passed with no
answer: it counts towards ejection (`Balancer.failed`) and is retried, on the same replica too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any

import grpc

from aiaas.identity import ClientIdentity
from services.common import errors
from services.common.interceptors import APP_STATUS_KEY
from services.common.server import channel_options
from services.gateway.balancer import Balancer, Replica

log = logging.getLogger("aiaas.gateway.upstream")

SERVICE = "inference.GRPCInferenceService"
DNS_SCHEME = "dns:///"


def split_dns_target(target: str) -> tuple[str, int]:
    host, _, port = target[len(DNS_SCHEME):].rpartition(":")
    if not host or not port.isdigit():
        raise errors.InvalidArgument(f"inference target {target!r}: expected dns:///host:port")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Application answers that another replica may serve (busy or not ready here).
_RETRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Channel states in which a replica cannot be reached at all.
_UNREACHABLE_STATES = frozenset({grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN})


class _ReplicaFailed(Exception):
    """A transport or gateway-level failure of one replica (counted towards its ejection)."""

    def __init__(self, error: errors.AiaasError) -> None:
        super().__init__(error.message)
        self.error = error


class _Refused(Exception):
    """An application answer another replica may serve (model loading, queue full or timed out)."""

    def __init__(self, error: errors.AiaasError) -> None:
        super().__init__(error.message)
        self.error = error


def answered_by_application(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the status came from the replica's own code (the trailer), not from grpc."""
    return any(key == APP_STATUS_KEY for key, _ in exc.trailing_metadata() or ())


def _close_soon(channel: grpc.aio.Channel) -> None:
    asyncio.ensure_future(channel.close())


class _Transport:
    """One replica's channel and its cached method callables (raw bytes in and out)."""

    def __init__(self, address: str, options: list[tuple[str, Any]], identity: ClientIdentity) -> None:
        self.channel = identity.aio_channel(address, options)
        self._methods: dict[str, Any] = {}

    def unary(self, method: str) -> Any:
        call = self._methods.get(method)
        if call is None:
            call = self.channel.unary_unary(f"/{SERVICE}/{method}")
            self._methods[method] = call
        return call


class InferenceUpstream:
    """Forwards calls to a pool of inference replicas (static list or a DNS name)."""

    def __init__(
        self, targets: Sequence[str], balancer: Balancer, *, max_message_bytes: int, max_attempts: int = 3,
        dns_refresh_s: float = 5.0, identity: ClientIdentity | None = None,
    ) -> None:
        # What the gateway presents to inference replicas (mTLS certificate or development token).
        self.identity = identity or ClientIdentity()
        self.targets = tuple(targets)
        self.balancer = balancer
        self.max_attempts = max_attempts
        self.dns_refresh_s = dns_refresh_s
        self._options = [*channel_options(max_message_bytes), ("grpc.enable_retries", 0)]
        self._dns_task: asyncio.Task[None] | None = None
        self._dns = [t for t in self.targets if t.startswith(DNS_SCHEME)]
        for target in self._dns:
            split_dns_target(target)

    async def start(self) -> None:
        static = [t for t in self.targets if not t.startswith(DNS_SCHEME)]
        self._apply(static + await self._resolve_all())
        if self._dns:
            self._dns_task = asyncio.create_task(self._refresh_forever(static), name="gateway-dns")

    async def close(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
        for replica in self.balancer.replicas:
            if replica.transport is not None:
                await replica.transport.channel.close()

    def _apply(self, addresses: list[str]) -> None:
        added, removed = self.balancer.set_addresses(addresses)
        for replica in added:
            replica.transport = _Transport(replica.address, self._options, self.identity)
        loop = asyncio.get_running_loop()
        for replica in removed:
            # In-flight calls keep their channel; close it once they are surely done.
            loop.call_later(60.0, _close_soon, replica.transport.channel)
        if added or removed:
            log.info("inference replicas: %s", ", ".join(r.address for r in self.balancer.replicas) or "none")

    async def _resolve_all(self) -> list[str]:
        loop = asyncio.get_running_loop()
        addresses: list[str] = []
        for target in self._dns:
            host, port = split_dns_target(target)
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve %s: %s", target, exc)
                addresses += [r.address for r in self.balancer.replicas if r.address not in self.targets]
                continue
            addresses += sorted({format_address(str(info[4][0]), port) for info in infos})
        return addresses

    async def _refresh_forever(self, static: list[str]) -> None:
        while True:
            await asyncio.sleep(self.dns_refresh_s)
            try:
                self._apply(static + await self._resolve_all())
            except Exception:  # a failed refresh keeps the current pool
                log.exception("DNS refresh failed")

    def reachable(self) -> bool:
        """Whether at least one replica can be reached: it answered last time (whatever the
        answer), or its channel is connected now (asking an unreachable one to reconnect)."""
        for replica in self.balancer.replicas:
            if replica.reachable:
                return True
            if replica.transport is not None:
                state = replica.transport.channel.get_state(try_to_connect=True)
                if state == grpc.ChannelConnectivity.READY:
                    replica.reachable = True
                    return True
        return False

    async def call(self, method: str, request: bytes, *, timeout: float,
                   metadata: Sequence[tuple[str, str]] = (), retry_not_found: bool = False) -> bytes:
        """Forward one unary call within `timeout`. After a replica failure another replica is
        tried (the same one again, after a short pause, once all were tried); after an
        application UNAVAILABLE or RESOURCE_EXHAUSTED another replica is tried when one is left,
        and otherwise that answer is passed through as it came.

        With `retry_not_found` (the registry says the target exists), a replica answering
        NOT_FOUND is one that has not loaded it yet, and another one is tried too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tried: set[str] = set()
        # Replicas that answered this call: not asked again for it.
        answered: set[str] = set()
        last: errors.AiaasError | None = None
        answer: errors.AiaasError | None = None
        for attempt in range(self.max_attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            replica = self.balancer.pick(tried | answered)
            if replica is None:
                if not tried and not answered:
                    raise errors.Unavailable("no inference replica is known")
                if not tried - answered:
                    break  # every replica answered: nothing to retry
                # Every replica failed once: try again after a short pause, within the deadline.
                tried.clear()
                await asyncio.sleep(min(0.05 * attempt, remaining / 2))
                replica = self.balancer.pick(answered)
                if replica is None:
                    break
            tried.add(replica.address)
            try:
                return await self._call_one(replica, method, request, deadline - loop.time(), metadata)
            except _ReplicaFailed as exc:
                last = exc.error
            except _Refused as exc:
                answer = exc.error
                answered.add(replica.address)
            except errors.NotFound as exc:
                if not retry_not_found:
                    raise
                last = exc
        if answer is not None:
            raise answer  # a replica's own answer, passed through
        if isinstance(last, errors.NotFound):
            raise last
        if last is not None:
            raise errors.Unavailable(f"no inference replica could serve the request: {last.message}")
        raise errors.DeadlineExceeded("deadline exceeded before an inference replica answered")

    async def _call_one(self, replica: Replica, method: str, request: bytes, timeout: float,
                        metadata: Sequence[tuple[str, str]]) -> bytes:
        """One call to one replica; raises `_ReplicaFailed`, `_Refused` or the replica's error."""
        replica.outstanding += 1
        try:
            response: bytes = await replica.transport.unary(method)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            # The replica's status, passed on to the caller with its message.
            error = errors.error_from_rpc(exc)
            if answered_by_application(exc):
                self.balancer.succeeded(replica)  # it answered: its transport works
                if code in _RETRY_ELSEWHERE:
                    raise _Refused(error) from None
                raise error from None
            if code == grpc.StatusCode.UNAVAILABLE:
                state = replica.transport.channel.get_state()
                self.balancer.failed(replica, unreachable=state in _UNREACHABLE_STATES)
                raise _ReplicaFailed(error) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.balancer.failed(replica)
            raise error from None
        finally:
            replica.outstanding -= 1
        self.balancer.succeeded(replica)
        return response

    async def call_each(self, method: str, request: bytes, *, timeout: float,
                        metadata: Sequence[tuple[str, str]] = ()) -> list[bytes]:
        """The answers of every routable replica (for statistics); failed replicas are left out,
        and when all fail the first error is raised."""
        replicas = self.balancer.routable()
        if not replicas:
            raise errors.Unavailable("no inference replica is known")

        async def one(replica: Replica) -> bytes | errors.AiaasError:
            try:
                return await self._call_one(replica, method, request, timeout, metadata)
            except (_ReplicaFailed, _Refused) as exc:
                return exc.error
            except errors.AiaasError as exc:
                return exc

        results = await asyncio.gather(*(one(r) for r in replicas))
        answers = [r for r in results if isinstance(r, bytes)]
        if not answers:
            raise next(r for r in results if isinstance(r, errors.AiaasError))
        return answers
