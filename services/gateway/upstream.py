"""The inference replicas behind the gateway: grpc.aio channels, DNS discovery, forwarding of raw
request bytes with deadline propagation, and a retry on another replica for UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any

import grpc

from services.common import errors
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


def _close_soon(channel: grpc.aio.Channel) -> None:
    asyncio.ensure_future(channel.close())


class _Transport:
    """One replica's channel and its cached method callables (raw bytes in and out)."""

    def __init__(self, address: str, options: list[tuple[str, Any]]) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=options)
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
        dns_refresh_s: float = 5.0,
    ) -> None:
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
            replica.transport = _Transport(replica.address, self._options)
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

    async def call(self, method: str, request: bytes, *, timeout: float,
                   metadata: Sequence[tuple[str, str]] = (), retry_not_found: bool = False) -> bytes:
        """Forward one unary call; another replica is tried on UNAVAILABLE within `timeout`.

        With `retry_not_found` (the registry says the target exists), a replica answering
        NOT_FOUND is one that has not loaded it yet, and another one is tried too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tried: set[str] = set()
        last: errors.AiaasError | None = None
        for attempt in range(self.max_attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            replica = self.balancer.pick(tried)
            if replica is None:
                if not tried:
                    raise errors.Unavailable("no inference replica is known")
                # Every replica failed once: try again after a short pause, within the deadline.
                tried.clear()
                await asyncio.sleep(min(0.05 * attempt, remaining / 2))
                replica = self.balancer.pick(tried)
                if replica is None:
                    break
            tried.add(replica.address)
            try:
                return await self._call_one(replica, method, request, deadline - loop.time(), metadata)
            except errors.Unavailable as exc:
                last = exc
            except errors.NotFound as exc:
                if not retry_not_found:
                    raise
                last = exc
        if isinstance(last, errors.NotFound):
            raise last
        if last is not None:
            raise errors.Unavailable(f"no inference replica could serve the request: {last.message}")
        raise errors.DeadlineExceeded("deadline exceeded before an inference replica answered")

    async def _call_one(self, replica: Replica, method: str, request: bytes, timeout: float,
                        metadata: Sequence[tuple[str, str]]) -> bytes:
        replica.outstanding += 1
        try:
            response: bytes = await replica.transport.unary(method)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.balancer.failed(replica)
            # The replica's status, passed on to the caller with its message.
            raise errors.error_from_rpc(exc) from None
        finally:
            replica.outstanding -= 1
        self.balancer.succeeded(replica)
        return response

    async def call_each(self, method: str, request: bytes, *, timeout: float,
                        metadata: Sequence[tuple[str, str]] = ()) -> list[bytes]:
        """The answers of every healthy replica (for statistics); failed replicas are left out,
        and when all fail the first error is raised."""
        replicas = self.balancer.healthy()
        if not replicas:
            raise errors.Unavailable("no healthy inference replica")

        async def one(replica: Replica) -> bytes | errors.AiaasError:
            try:
                return await self._call_one(replica, method, request, timeout, metadata)
            except errors.AiaasError as exc:
                return exc

        results = await asyncio.gather(*(one(r) for r in replicas))
        answers = [r for r in results if isinstance(r, bytes)]
        if not answers:
            raise next(r for r in results if isinstance(r, errors.AiaasError))
        return answers
