"""A TCP relay in front of a service whose connections a chaos test can refuse or cut.

The gateways reach the registry through one of these, so a test can break their change feed at a
chosen point of the byte stream: `refuse()` drops every open connection and turns new ones away;
`cut_next(n, after_bytes)` lets the next `n` connections carry `after_bytes` bytes towards the
client and then resets them (mid-snapshot when `after_bytes` is less than a snapshot's size).

It runs its own event loop in a daemon thread, so the test's loop (and the load it drives) never
waits on it. A fault proxy that cuts after N bytes is a few lines of asyncio; toxiproxy would do
it too, but it is a Go server this project does not otherwise need.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from concurrent.futures import Future
from typing import Any

CHUNK = 64 * 1024


@dataclasses.dataclass
class Relayed:
    """One client connection: bytes sent towards the client, and whether the proxy cut it."""

    bytes_down: int = 0
    cut_at: int | None = None  # the byte budget it was given, None: unlimited
    cut: bool = False
    refused: bool = False


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.connections: list[Relayed] = []
        self._refusing = False
        self._budgets: list[int] = []
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- control, from the test's thread --------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._listen()).result(timeout=10)
        return self

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._shutdown()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def refuse(self) -> None:
        """Reset every open connection and turn new ones away until `relay()`."""
        self._run(self._set_refusing(True)).result(timeout=10)

    def relay(self) -> None:
        """Relay new connections again."""
        self._run(self._set_refusing(False)).result(timeout=10)

    def cut_next(self, connections: int, after_bytes: int) -> None:
        """The next `connections` connections are reset once `after_bytes` went to the client."""
        if connections < 1 or after_bytes < 1:
            raise ValueError("connections and after_bytes must be positive")
        self._run(self._set_budgets([after_bytes] * connections)).result(timeout=10)

    def cuts(self) -> list[Relayed]:
        return [c for c in list(self.connections) if c.cut]

    # ---- the relay, on its own loop ----------------------------------------------------------------

    def _run(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()

    async def _set_refusing(self, refusing: bool) -> None:
        self._refusing = refusing
        if refusing:
            self._reset_all()

    async def _set_budgets(self, budgets: list[int]) -> None:
        self._budgets = budgets

    def _reset_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        relayed = Relayed()
        self.connections.append(relayed)
        if self._refusing:
            relayed.refused = True
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()  # the service is down: the client sees a reset, as it would
            return
        relayed.cut_at = self._budgets.pop(0) if self._budgets else None
        self._open.update((client_writer, server_writer))
        try:
            await asyncio.gather(self._pump(client_reader, server_writer, None),
                                 self._pump(server_reader, client_writer, relayed))
        finally:
            for writer in (client_writer, server_writer):
                self._open.discard(writer)
                writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    counted: Relayed | None) -> None:
        """Copy one direction until EOF, an error, or (towards the client) the byte budget."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(CHUNK):
                if counted is not None and counted.cut_at is not None:
                    room = counted.cut_at - counted.bytes_down
                    if len(chunk) >= room:
                        writer.write(chunk[:room])
                        counted.bytes_down += room
                        with contextlib.suppress(OSError):
                            await writer.drain()
                        counted.cut = True
                        break
                if counted is not None:
                    counted.bytes_down += len(chunk)
                writer.write(chunk)
                await writer.drain()
        # One side ended (or was cut): reset the other side too, so no connection is half held.
        writer.transport.abort()
