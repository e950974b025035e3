"""The inference replicas behind the gateway: grpc.aio channels, DNS discovery, active health
checks, and forwarding of raw request bytes with deadline propagation, retries and hedges (the
rules of a call's tries are in forwarding.py, the per-try timeout in try_timeout.py).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from aiaas.identity import ClientIdentity
from aiaas.inference.v1 import inference_pb2 as pb
from services.common import errors
from services.common.interceptors import APP_STATUS_KEY
from services.common.server import channel_options
from services.gateway.balancer import Balancer, Replica
from services.gateway.forwarding import ForwardedCall, Refused, ReplicaFailed
from services.gateway.generation_mux import LIMITS_METHOD as MUX_LIMITS
from services.gateway.generation_mux import METHOD as MUX_METHOD
from services.gateway.generation_mux import Generation, GenerationMux, StreamFailed, TimedOut, forwarded
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
_RETRY_ELSEWHERE_NAMES = frozenset(code.name for code in _RETRY_ELSEWHERE)
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
        # Generations multiplexed on one stream per channel, where the replica serves it (an older
        # inference service does not: ModelStreamInfer per generation there).
        self._muxes = [GenerationMux(functools.partial(self._open_mux, c)) for c in self.channels]
        self._next_mux = itertools.cycle(self._muxes)
        # None until the replica was asked (GetLimits); then whether it serves the stream.
        self.mux_supported: bool | None = None
        self._probe: asyncio.Task[None] | None = None

    async def probe_mux(self, timeout: float) -> bool:
        """Whether the replica serves the multiplexed generation stream (asked once, by a unary
        GetLimits: a stream's own refusal can come back as a meaningless INTERNAL). An answer
        other than yes or UNIMPLEMENTED leaves it unknown: this generation uses ModelStreamInfer."""
        if self.mux_supported is None:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.get_running_loop().create_task(self._ask_limits())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._probe), timeout)
        return bool(self.mux_supported)

    async def _ask_limits(self) -> None:
        method = self.channel.unary_unary(MUX_LIMITS, request_serializer=pb.GetLimitsRequest.SerializeToString,
                                          response_deserializer=pb.GetLimitsResponse.FromString)
        try:
            await method(pb.GetLimitsRequest(), timeout=5.0, metadata=self._auth or None)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not answered_by_application(exc):
                self.mux_supported = False
            return
        self.mux_supported = True

    def mux(self) -> GenerationMux:
        return next(self._next_mux)

    def _open_mux(self, channel: grpc.aio.Channel) -> Any:
        method = channel.stream_stream(MUX_METHOD, request_serializer=pb.StreamGenerationsRequest.SerializeToString,
                                       response_deserializer=pb.StreamGenerationsResponse.FromString)
        return method(metadata=self._auth or None)

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
        for mux in self._muxes:
            await mux.close()
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

    def _mux_failure(self, replica: Replica, exc: StreamFailed) -> Exception | None:
        """What the failure of a multiplexed stream means for one of its generations (as `_failure`
        for its call); None when the replica does not serve the method at all."""
        rpc = exc.rpc_error
        if rpc is None:  # ended or closed without a status
            self.balancer.failed(replica, unreachable=replica.transport.unreachable())
            return ReplicaFailed(errors.Unavailable(str(exc)))
        if rpc.code() == grpc.StatusCode.UNIMPLEMENTED and not answered_by_application(rpc):
            return None
        return self._failure(replica, rpc)

    async def stream(self, request: bytes, *, timeout: float, metadata: Sequence[tuple[str, str]] = (),
                     retry_not_found: bool = False) -> AsyncIterator[bytes]:
        """One request to a decoupled model on one replica, yielding each raw
        `ModelStreamInferResponse` until its final one: on the replica's multiplexed generation
        stream (generation_mux.py: one message per engine step for all of them), or, from a
        replica without it, on a `ModelStreamInfer` call of its own.

        Until the first response, a replica failure or an application UNAVAILABLE /
        RESOURCE_EXHAUSTED (and, with `retry_not_found`, NOT_FOUND) moves the request to another
        replica not tried yet, within `timeout` and `max_attempts`; after it, an error ends the
        generation (tokens already sent cannot be taken back). No hedging: a generation is never
        run twice. Closing the iterator cancels the generation upstream, which frees its KV cache
        on the replica. On a `ModelStreamInfer` call, send `triton_grpc_error: true` in `metadata`
        for errors as statuses (the multiplexed stream always gives them so).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tried: set[str] = set()
        last: errors.AiaasError | None = None
        answer: errors.AiaasError | None = None
        attempts = 0
        again: Replica | None = None  # a replica to ask again the other way (it lacks the multiplexed stream)
        while attempts < self.max_attempts:
            attempts += 1
            remaining = deadline - loop.time()
            replica = (again or self.balancer.pick(tried)) if remaining > 0 else None
            again = None
            if replica is None:
                if not tried and remaining > 0:
                    raise errors.Unavailable("no inference replica is known")
                break
            tried.add(replica.address)
            mux = replica.transport.mux_supported
            if mux is None:
                mux = await replica.transport.probe_mux(min(remaining, 5.0))
            opened: _Opened = _MuxOpened(self, replica) if mux else _CallOpened(self, replica)
            try:
                try:
                    response = await opened.start(request, remaining, metadata)
                except _TryElsewhere as retry:
                    if retry.same_replica:  # not a try: the replica is asked again, the other way
                        again = replica
                        attempts -= 1
                    elif retry.refused:
                        answer = retry.error
                    elif retry.error is not None:
                        last = retry.error
                    continue
                except errors.NotFound as exc:
                    if not retry_not_found:
                        raise
                    last = exc
                    continue
                while response is not None:
                    yield response
                    response = await opened.next()
                return
            finally:
                opened.close()
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


class _TryElsewhere(Exception):
    """A generation's first try failed in a way another try may not: `refused` (an application
    answer another replica may serve), a replica failure (`error`), or `same_replica` (the replica
    does not serve the multiplexed stream: try it again with ModelStreamInfer)."""

    def __init__(self, error: errors.AiaasError | None, *, refused: bool = False, same_replica: bool = False) -> None:
        super().__init__(error.message if error is not None else "")
        self.error = error
        self.refused = refused
        self.same_replica = same_replica


def _first_failure(failure: Exception) -> Exception:
    """A failure before the first response: what `stream` retries (`_TryElsewhere`) or raises."""
    if isinstance(failure, ReplicaFailed):
        return _TryElsewhere(failure.error)
    if isinstance(failure, Refused):
        return _TryElsewhere(failure.error, refused=True)
    return failure


def _later_failure(failure: Exception) -> Exception:
    """A failure after the first response ends the generation with the replica's error."""
    return failure.error if isinstance(failure, ReplicaFailed | Refused) else failure


class _Opened(abc.ABC):
    """One try of a generation on one replica: `start` gives the first response (None: it ended
    with none), `next` each following one (None after the final one), `close` ends the try."""

    def __init__(self, upstream: InferenceUpstream, replica: Replica) -> None:
        self.upstream = upstream
        self.replica = replica
        replica.outstanding += 1

    @abc.abstractmethod
    async def start(self, request: bytes, timeout: float, metadata: Sequence[tuple[str, str]]) -> bytes | None:
        """Send the request; its first response."""

    @abc.abstractmethod
    async def next(self) -> bytes | None:
        """The next response; None after the final one."""

    def close(self) -> None:
        self.replica.outstanding -= 1


class _MuxOpened(_Opened):
    """On the replica's multiplexed generation stream."""

    def __init__(self, upstream: InferenceUpstream, replica: Replica) -> None:
        super().__init__(upstream, replica)
        self.mux = replica.transport.mux()
        self.generation: Generation | None = None

    async def start(self, request: bytes, timeout: float, metadata: Sequence[tuple[str, str]]) -> bytes | None:
        try:
            self.generation = await self.mux.start(request, timeout=timeout,
                                                   request_id=forwarded(metadata, "x-request-id"),
                                                   traceparent=forwarded(metadata, "traceparent"))
            event = await self.generation.next()
        except StreamFailed as exc:
            failure = self.upstream._mux_failure(self.replica, exc)
            if failure is None:  # an inference service without the method
                self.replica.transport.mux_supported = False
                raise _TryElsewhere(None, same_replica=True) from None
            raise _first_failure(failure) from None
        except TimedOut as exc:
            self.upstream.balancer.failed(self.replica, stalled=True)
            raise errors.DeadlineExceeded(str(exc)) from None
        self.upstream.balancer.succeeded(self.replica)  # it answered: its transport works
        if event.error_code:
            error = errors.error_for_status(event.error_code)(event.error_message)
            if event.error_code in _RETRY_ELSEWHERE_NAMES:
                raise _TryElsewhere(error, refused=True)
            raise error
        return event.response

    async def next(self) -> bytes | None:
        generation = self.generation
        if generation is None or generation.done:
            return None
        try:
            event = await generation.next()
        except StreamFailed as exc:
            failure = self.upstream._mux_failure(self.replica, exc)
            raise (_later_failure(failure) if failure is not None else errors.Unavailable(str(exc))) from None
        except TimedOut as exc:
            raise errors.DeadlineExceeded(str(exc)) from None
        if event.error_code:
            raise errors.error_for_status(event.error_code)(event.error_message)
        return event.response

    def close(self) -> None:
        super().close()
        if self.generation is not None and not self.generation.done:
            self.mux.cancel(self.generation)  # closed early: the replica frees its KV cache


class _CallOpened(_Opened):
    """On a `ModelStreamInfer` call of its own."""

    call: Any = None

    async def start(self, request: bytes, timeout: float, metadata: Sequence[tuple[str, str]]) -> bytes | None:
        self.call = call = self.replica.transport.stream("ModelStreamInfer")(timeout=timeout, metadata=metadata)
        try:
            await call.write(request)
            await call.done_writing()
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _first_failure(self.upstream._failure(self.replica, exc)) from None
        self.upstream.balancer.succeeded(self.replica)
        return None if first is grpc.aio.EOF else first  # type: ignore[no-any-return]

    async def next(self) -> bytes | None:
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise _later_failure(self.upstream._failure(self.replica, exc)) from None
        return None if response is grpc.aio.EOF else response  # type: ignore[no-any-return]

    def close(self) -> None:
        super().close()
        if self.call is not None and not self.call.done():
            self.call.cancel()
