"""`python -m services.gateway.process INDEX`: one of the gateway's other processes (docs/gateway.md,
"Processes"), started by the gateway itself when `processes` > 1, never by hand.

It reads its settings (one JSON line, secrets included) from stdin, serves the gRPC and OpenAI
ports the first process bound (SO_REUSEPORT), prints the ready line once it accepts, and drains
on SIGTERM, or when its stdin closes (the first process is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from services.common import eventloop

log = logging.getLogger("aiaas.gateway")


async def serve(index: int) -> int:
    from services.common.logs import configure_logging
    from services.common.telemetry import LOOPBACK_METRICS, configure_telemetry, exported_port
    from services.gateway.server import PROCESS_READY_LINE, create_service, settings_from_json

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    settings = settings_from_json((await stdin.readline()).decode())
    if settings.metrics_port:
        # The first process serves every process's metrics on metrics_port, read from this
        # process's exporter on a loopback port it is told in the ready line.
        configure_logging("gateway", settings.log_level, settings.log_json)
        configure_telemetry("gateway", otlp_endpoint=settings.otlp_endpoint, metrics_port=LOOPBACK_METRICS,
                            metrics_host="127.0.0.1")
    service = create_service(settings, process_index=index)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    orphaned = loop.create_task(stdin.read())  # EOF: the first process is gone
    starting = loop.create_task(service.start())
    signalled = loop.create_task(stopping.wait())
    await asyncio.wait({starting, signalled, orphaned}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done() or starting.exception() is not None:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await service.close()
        return 1
    print(PROCESS_READY_LINE, exported_port(), flush=True)
    await asyncio.wait({signalled, orphaned}, return_when=asyncio.FIRST_COMPLETED)
    if orphaned.done() and not stopping.is_set():
        log.error("gateway process %d: the first gateway process is gone; draining", index)
    signalled.cancel()
    orphaned.cancel()
    await service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
        print("usage: python -m services.gateway.process INDEX  (started by the gateway, settings on stdin)",
              file=sys.stderr)
        return 2
    return eventloop.run(serve(int(args[0])))


if __name__ == "__main__":
    sys.exit(main())
