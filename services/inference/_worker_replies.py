"""The wire between the service and its model workers, both ways: one JSON value per message.

Nothing on it is pickled, in either direction: the service reads a worker's messages as JSON
(bounded, shape-checked: `workers._read_reply`, `generative_workers`), and a worker reads the
service's the same way (`send_message` / `read_message`), so no unpickler runs in a process that
holds model code. A generative worker (`_generative_worker`, `_vllm_worker`) sends the chunks of
one round batched into one `["chunks", [...]]` message cut below the service's read limit.

Standard library only: the vLLM worker imports this under an interpreter that has none of aiaas's
dependencies.
"""

from __future__ import annotations

import json
import threading
from multiprocessing.connection import Connection
from typing import Any

# The most a worker reads of one message from the service (a config, a run or a generate request:
# a generate request's prompt or messages are at most 1 MiB, 6 MiB once JSON-escaped). The service
# refuses to send more, so an oversized message never reaches the pipe (whose framing it would break).
MAX_MESSAGE_BYTES = 16 * 2**20

# Bounds a worker keeps itself to, so that its messages stay under the service's reply limit.
MAX_TEXT_CHARS = 64 * 1024
MAX_ERROR_CHARS = 2000
# A "chunks" message is cut before it passes this many bytes (the service reads at most 1 MiB); one
# chunk alone stays within it (64 Ki characters, at most 12 bytes each in ASCII-escaped JSON).
MAX_BATCH_BYTES = 768 * 1024


def send_message(conn: Connection, message: Any) -> None:
    """One message to a worker: a JSON value (tuples go as lists). ValueError, with nothing sent,
    when it is over `MAX_MESSAGE_BYTES`."""
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {len(data)} bytes is over the worker pipe's limit of {MAX_MESSAGE_BYTES}")
    conn.send_bytes(data)


def read_message(conn: Connection) -> Any:
    """The next message from the service, as JSON: never unpickled. EOFError when the service is
    gone, OSError when it sent something over `MAX_MESSAGE_BYTES`, ValueError when not JSON."""
    return json.loads(conn.recv_bytes(MAX_MESSAGE_BYTES))


class Sender:
    """Replies from several threads (a reader refusing a request, the engine sending chunks), one at a time."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, *fields: Any) -> None:
        self.send_bytes(json.dumps(fields).encode())

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self._conn.send_bytes(data)
            except OSError:
                self.broken = True  # the service is gone; the reader sees EOF and stops


class ChunkBatch:
    """The chunks of one round (an engine step), sent as one message, or a few, at `flush`.

    One message per step instead of one per sequence: at 16-64 sequences per step that is 16-64
    times fewer writes here and wake-ups in the service. One thread (or event loop) only.
    """

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, wire: dict[str, Any]) -> None:
        part = json.dumps(wire).encode()
        if self._parts and self._size + len(part) + 16 > MAX_BATCH_BYTES:
            self.flush()
        self._parts.append(part)
        self._size += len(part) + 1

    def flush(self) -> None:
        if not self._parts:
            return
        parts, self._parts, self._size = self._parts, [], 0
        self._sender.send_bytes(b'["chunks",[' + b",".join(parts) + b"]]")


def us(seconds: float) -> int:
    """Whole microseconds, never negative (the timings of a last chunk)."""
    return max(0, int(seconds * 1e6))
