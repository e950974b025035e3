"""The inference replicas behind the gateway: grpc.aio channels, DNS discovery, active health
checks, and forwarding of raw request bytes with deadline propagation, retries and hedges (the
rules of a call's tries are in forwarding.py, the per-try timeout in try_timeout.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from aiaas.identity import ClientIdentity
from services.common import errors
from services.common.interceptors import APP_STATUS_KEY
from services.common.server import channel_options
from services.gateway.balancer import Balancer, Replica
from services.gateway.forwarding import ForwardedCall, Refused, ReplicaFailed
from services.gateway.health_check import HealthChecker, health_check_callable
from services.gateway.try_timeout import LatencyWindow, TryTimeouts

log = logging.getLogger("aiaas.gateway.upstream")

SERVICE = "inference.GRPCInferenceService"
DNS_SCHEME = "dns:///"
# Calls whose tries are timed and hedged: inference is idempotent. Reads are cheap and quick.
HEDGED_METHODS = frozenset({"ModelInfer"})


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


def answered_by_application(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the status came from the replica's own code (the trailer), not from grpc."""
    return any(key == APP_STATUS_KEY for key, _ in exc.trailing_metadata() or ())


def _close_soon(transport: _Transport) -> None:
    asyncio.ensure_future(transport.close())


class _Transport:
    """One replica's channels and their cached method callables (raw bytes in and out).

    `connections` channels, each its own TCP connection (a local subchannel pool), taken in turn:
    a replica whose processes share its port (the inference service's frontends, SO_REUSEPORT)
    gets the gateway's calls spread over them, where one connection would land on one process.

    The identity token (development mode) goes into each call's metadata here rather than through
    a channel interceptor, which would route every streamed token through extra Python.
    """

    def __init__(self, address: str, options: list[tuple[str, Any]], identity: ClientIdentity,
                 connections: int = 1) -> None:
        own = [*options, ("grpc.use_local_subchannel_pool", 1)] if connections > 1 else options
        self.channels = [identity.aio_channel(address, own, token_interceptors=False)
                         for _ in range(max(1, connections))]
        self.channel = self.channels[0]
        self._auth = identity.metadata()
        self._methods: dict[str, Iterator[Any]] = {}
        self.health_check = health_check_callable(self.channel)  # open to every caller: no token

    def unary(self, method: str) -> Any:
        calls = self._methods.get(method)
        if calls is None:
            calls = self._methods[method] = itertools.cycle(
                [self._authenticated(c.unary_unary(f"/{SERVICE}/{method}")) for c in self.channels])
        return next(calls)

    def stream(self, method: str) -> Any:
        calls = self._methods.get(method)
        if calls is None:
            calls = self._methods[method] = itertools.cycle(
                [self._authenticated(c.stream_stream(f"/{SERVICE}/{method}")) for c in self.channels])
        return next(calls)

    def _authenticated(self, multicallable: Any) -> Any:
        auth = self._auth
        if not auth:
            return multicallable

        def call(*args: Any, metadata: Sequence[tuple[str, str]] | None = None, **kwargs: Any) -> Any:
            return multicallable(*args, metadata=(*(metadata or ()), *auth), **kwargs)

        return call

    def unreachable(self) -> bool:
        """The channel cannot connect now (refused, or in its reconnect backoff)."""
        return self.channel.get_state() in _UNREACHABLE_STATES

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class InferenceUpstream:
    """Forwards calls to a pool of inference replicas (static list or a DNS name)."""

    def __init__(
        self, targets: Sequence[str], balancer: Balancer, *, max_message_bytes: int, max_attempts: int = 3,
        dns_refresh_s: float = 5.0, identity: ClientIdentity | None = None,
        health_check_interval_s: float = 0.0, health_check_timeout_s: float = 1.0,
        try_timeouts: TryTimeouts | None = None, connections: int = 1,
    ) -> None:
        # What the gateway presents to inference replicas (mTLS certificate or development token).
        self.identity = identity or ClientIdentity()
        self.targets = tuple(targets)
        self.connections = connections
        self.balancer = balancer
        self.max_attempts = max_attempts
        self.dns_refresh_s = dns_refresh_s
        self._options = [*channel_options(max_message_bytes), ("grpc.enable_retries", 0)]
        self.health: HealthChecker | None = None
        if health_check_interval_s > 0:
            self.health = HealthChecker(balancer, interval_s=health_check_interval_s,
                                        timeout_s=health_check_timeout_s)
            # grpc's reconnect backoff grows to 120 s: a replica back on its port would wait that
            # out. Capped at the check interval, the next check after it is back reconnects.
            backoff_ms = max(100, int(health_check_interval_s * 1000))
            self._options += [("grpc.initial_reconnect_backoff_ms", backoff_ms),
                              ("grpc.max_reconnect_backoff_ms", backoff_ms)]
        self.try_timeouts = try_timeouts if try_timeouts is not None and try_timeouts.enabled else None
        # Latencies of every replica's answered inference tries: the per-try timeout of a replica
        # that has answered too few yet.
        self.pool_latency = LatencyWindow()
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
        if self.health is not None:
            await self.health.close()
        for replica in self.balancer.replicas:
            if replica.transport is not None:
                await replica.transport.close()

    def _apply(self, addresses: list[str]) -> None:
        added, removed = self.balancer.set_addresses(addresses)
        for replica in added:
            replica.transport = _Transport(replica.address, self._options, self.identity, self.connections)
            if self.health is not None:
                self.health.watch(replica)
        loop = asyncio.get_running_loop()
        for replica in removed:
            if self.health is not None:
                self.health.forget(replica)
            # In-flight calls keep their channel; close it once they are surely done.
            loop.call_later(60.0, _close_soon, replica.transport)
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
        and otherwise that answer is passed through as it came. An inference try unanswered past
        its per-try timeout is hedged on another replica (see forwarding.py).

        With `retry_not_found` (the registry says the target exists), a replica answering
        NOT_FOUND is one that has not loaded it yet, and another one is tried too.
        """

        def begin(replica: Replica, seconds: float) -> Any:
            return replica.transport.unary(method)(request, timeout=seconds, metadata=metadata)

        forwarded = ForwardedCall(
            self.balancer, begin, self._finish, deadline=asyncio.get_running_loop().time() + timeout,
            max_attempts=self.max_attempts, retry_not_found=retry_not_found,
            try_timeouts=self.try_timeouts if method in HEDGED_METHODS else None, pool_latency=self.pool_latency,
        )
        return await forwarded.run()

    async def _call_one(self, replica: Replica, method: str, request: bytes, timeout: float,
                        metadata: Sequence[tuple[str, str]]) -> bytes:
        """One call to one replica; raises `ReplicaFailed`, `Refused` or the replica's error."""
        replica.outstanding += 1
        try:
            return await self._finish(replica, replica.transport.unary(method)(request, timeout=timeout,
                                                                               metadata=metadata))
        finally:
            replica.outstanding -= 1

    async def _finish(self, replica: Replica, call: Any) -> bytes:
        """The answer of a call to `replica`, once it comes; raises `ReplicaFailed`, `Refused` or
        the replica's error, and tells the balancer which it was."""
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as exc:
            raise self._failure(replica, exc) from None
        self.balancer.succeeded(replica)
        return response

    def _failure(self, replica: Replica, exc: grpc.aio.AioRpcError) -> Exception:
        """What a failed call to `replica` means (`ReplicaFailed`, `Refused` or the replica's own
        error), told to the balancer."""
        code = exc.code()
        # The replica's status, passed on to the caller with its message.
        error = errors.error_from_rpc(exc)
        if answered_by_application(exc):
            self.balancer.succeeded(replica)  # it answered: its transport works
            return Refused(error) if code in _RETRY_ELSEWHERE else error
        if code == grpc.StatusCode.UNAVAILABLE:
            self.balancer.failed(replica, unreachable=replica.transport.unreachable())
            return ReplicaFailed(error)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.balancer.failed(replica, stalled=True)  # no answer within the deadline
        return error

    async def stream(self, request: bytes, *, timeout: float, metadata: Sequence[tuple[str, str]] = (),
                     retry_not_found: bool = False) -> AsyncIterator[bytes]:
        """One request to a decoupled model: a `ModelStreamInfer` call of its own on one replica,
        yielding each raw `ModelStreamInferResponse` until the replica ends the call.

        Until the first response, a replica failure or an application UNAVAILABLE /
        RESOURCE_EXHAUSTED (and, with `retry_not_found`, NOT_FOUND) moves the request to another
        replica not tried yet, within `timeout` and `max_attempts`; after it, an error ends the
        generation (tokens already sent cannot be taken back). No hedging: a generation is never
        run twice. Closing the iterator cancels the upstream call, which frees the generation's
        KV cache on the replica. Send `triton_grpc_error: true` in `metadata` for errors as statuses.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tried: set[str] = set()
        last: errors.AiaasError | None = None
        answer: errors.AiaasError | None = None
        for _ in range(self.max_attempts):
            remaining = deadline - loop.time()
            replica = self.balancer.pick(tried) if remaining > 0 else None
            if replica is None:
                if not tried and remaining > 0:
                    raise errors.Unavailable("no inference replica is known")
                break
            tried.add(replica.address)
            call = replica.transport.stream("ModelStreamInfer")(timeout=remaining, metadata=metadata)
            replica.outstanding += 1
            try:
                try:
                    await call.write(request)
                    await call.done_writing()
                    first = await call.read()
                except grpc.aio.AioRpcError as exc:
                    failure = self._failure(replica, exc)
                    if isinstance(failure, ReplicaFailed):
                        last = failure.error
                        continue
                    if isinstance(failure, Refused):
                        answer = failure.error
                        continue
                    if retry_not_found and isinstance(failure, errors.NotFound):
                        last = failure
                        continue
                    raise failure from None
                self.balancer.succeeded(replica)
                if first is grpc.aio.EOF:
                    return
                yield first
                while True:
                    try:
                        response = await call.read()
                    except grpc.aio.AioRpcError as exc:
                        failure = self._failure(replica, exc)
                        raise (failure.error if isinstance(failure, ReplicaFailed | Refused) else failure) from None
                    if response is grpc.aio.EOF:
                        return
                    yield response
            finally:
                replica.outstanding -= 1
                if not call.done():
                    call.cancel()
        if answer is not None:
            raise answer
        if isinstance(last, errors.NotFound):
            raise last
        if last is not None:
            raise errors.Unavailable(f"no inference replica could serve the request: {last.message}")
        raise errors.DeadlineExceeded("deadline exceeded before an inference replica answered")

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
            except (ReplicaFailed, Refused) as exc:
                return exc.error
            except errors.AiaasError as exc:
                return exc

        results = await asyncio.gather(*(one(r) for r in replicas))
        answers = [r for r in results if isinstance(r, bytes)]
        if not answers:
            raise next(r for r in results if isinstance(r, errors.AiaasError))
        return answers
