"""One-line, rate-limited warnings while a dependency (the registry, Redis, PostgreSQL, the monitor) is unreachable.

A loop that retries a dependency every second would otherwise log the same failure, traceback
and all, every second. `OutageLog` logs one line when an outage starts (the dependency, its
address, the error as "STATUS: message"), at most one more per `every_s` while it lasts (how long
and how many failures so far), and one line when the dependency answers again. Each user keeps
one `OutageLog` per dependency it calls; `failed` and `recovered` cost a comparison when quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from aiaas.errors import AiaasError

WARN_EVERY_S = 60.0
MAX_ERROR_CHARS = 200


def describe_error(error: BaseException | str) -> str:
    """The error on one short line: "CODE: message" for a gRPC status or an AiaasError, else "Type: text"."""
    if isinstance(error, str):
        text = error
    elif isinstance(error, AiaasError):
        text = f"{error.code.name}: {error.message}"
    elif callable(getattr(error, "code", None)) and callable(getattr(error, "details", None)):
        # A grpc.RpcError that carries a status (AioRpcError, or a sync call's error).
        code = error.code()  # type: ignore[attr-defined]
        text = f"{getattr(code, 'name', code)}: {error.details() or ''}"  # type: ignore[attr-defined]
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."


def url_address(url: str, default_port: int | None = None) -> str:
    """Where a URL points, to name it in the log: host:port (or a socket path), never its credentials."""
    parts = urlsplit(url)
    if not parts.hostname:
        return parts.path
    port = parts.port or default_port
    return f"{parts.hostname}:{port}" if port else parts.hostname


class OutageLog:
    """Tells the log about one dependency's outages, a line at a time; see the module docstring.

    `user` prefixes every line (which follower or client noticed); `level` is that of the
    warnings (recovery is INFO).
    """

    def __init__(self, logger: logging.Logger, dependency: str, address: str = "", *, user: str = "",
                 every_s: float = WARN_EVERY_S, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.logger = logger
        self.dependency = dependency
        self.address = address
        self.every_s = every_s
        self.level = level
        self.failures = 0  # in the current outage
        self.outages = 0  # started since this log was made
        self._prefix = f"{user}: " if user else ""
        self._who = f"{dependency} at {address}" if address else dependency
        self._clock = clock
        self._down_since: float | None = None
        self._last_line = 0.0

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, error: BaseException | str, *, consequence: str = "",
               exc_info: BaseException | None = None) -> bool:
        """Count one failed call; log a line if it starts an outage or `every_s` passed since the last.

        `consequence` (what this service does meanwhile) goes on the first line; `exc_info` adds a
        traceback to the lines that are logged, for errors that are bugs rather than outages.
        Returns whether a line was logged.
        """
        now = self._clock()
        self.failures += 1
        described = describe_error(error)
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            then = f"; {consequence}" if consequence else ""
            message = (f"{self._prefix}{self._who} unreachable: {described}{then} "
                       f"(at most one line per {self.every_s:g} s until it answers)")
        elif now - self._last_line >= self.every_s:
            message = (f"{self._prefix}{self._who} still unreachable after {now - self._down_since:.0f} s "
                       f"and {self.failures} failures: {described}")
        else:
            return False
        self._last_line = now
        self.logger.log(self.level, "%s", message, exc_info=exc_info, extra=self._extra(described))
        return True

    def recovered(self, note: str = "") -> bool:
        """Note a call that got an answer; log one line if that ends an outage. Returns whether it did."""
        if self._down_since is None:
            return False
        elapsed = self._clock() - self._down_since
        then = f"; {note}" if note else ""
        self.logger.info("%s%s answers again after %.1f s and %d failures%s", self._prefix, self._who, elapsed,
                         self.failures, then, extra=self._extra(""))
        self._down_since = None
        self.failures = 0
        return True

    def _extra(self, error: str) -> dict[str, str]:
        """Fields for the JSON log (services.common.logs.JsonFormatter writes extras as keys)."""
        fields = {"dependency": self.dependency, "address": self.address}
        if error:
            fields["error"] = error
        return fields
