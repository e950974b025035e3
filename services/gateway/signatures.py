"""Version signatures for request validation, fetched from the registry once, in the background.

The first request to a version is checked against generic limits only and starts the fetch;
later ones are also checked against the version's inputs (names, datatypes, shapes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.gateway.limits import Signature

log = logging.getLogger("aiaas.gateway.signatures")

Fetch = Callable[[str, int], Awaitable[Signature | None]]


class SignatureCache:
    def __init__(self, fetch: Fetch | None, max_entries: int = 10_000, retry_s: float = 30.0) -> None:
        self.fetch = fetch
        self.retry_s = retry_s
        self.max_entries = max_entries
        self._known: dict[tuple[str, int], Signature | None] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def get(self, model: str, version: int) -> Signature | None:
        key = (model, version)
        if key in self._known:
            return self._known[key]
        if self.fetch is not None and len(self._known) < self.max_entries:
            self._known[key] = None
            task = asyncio.get_running_loop().create_task(self._load(key))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return None

    def put(self, model: str, version: int, signature: Signature | None) -> None:
        self._known[(model, version)] = signature

    async def _load(self, key: tuple[str, int]) -> None:
        if self.fetch is None:
            return
        try:
            signature = await self.fetch(*key)
        except Exception as exc:  # noqa: BLE001 - validation falls back to the generic limits
            log.debug("no signature for %s version %d: %s", key[0], key[1], exc)
            # Try again later, not on every request while the registry is away.
            asyncio.get_running_loop().call_later(self.retry_s, self._known.pop, key, None)
            return
        # A signature with no inputs declares nothing to check against.
        self._known[key] = signature if signature is not None and signature.inputs else None
