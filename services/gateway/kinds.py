"""Which versions are decoupled (generative) models, learnt from inference's `ModelConfig`
(`model_transaction_policy.decoupled`) once per version and cached, like signatures.

`known` answers from the cache at once (None when not known yet, starting the lookup in the
background); `decoupled` waits for the lookup (one per version at a time, however many callers ask).
A lookup that fails counts as "not decoupled" for `retry_s`, then is asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tritonclient.grpc import service_pb2 as pb

log = logging.getLogger("aiaas.gateway.kinds")

# Asks inference for a ModelConfig (forwarded model name, version) and answers the serialized response.
FetchConfig = Callable[[str, str], Awaitable[bytes]]


class ModelKinds:
    def __init__(self, fetch: FetchConfig | None, *, max_entries: int = 10_000, retry_s: float = 30.0) -> None:
        self.fetch = fetch
        self.max_entries = max_entries
        self.retry_s = retry_s
        self._known: dict[tuple[str, int], bool] = {}
        self._pending: dict[tuple[str, int], asyncio.Task[bool]] = {}

    def known(self, model: str, version: int, forward: tuple[str, str]) -> bool | None:
        """Whether the version is decoupled, from the cache; None (and a lookup started) when unknown."""
        found = self._known.get((model, version))
        if found is None and self.fetch is not None:
            self._lookup((model, version), forward)
        return found

    async def decoupled(self, model: str, version: int, forward: tuple[str, str]) -> bool:
        """Whether the version is decoupled, asking inference the first time."""
        found = self._known.get((model, version))
        if found is not None:
            return found
        if self.fetch is None:
            return False
        return await asyncio.shield(self._lookup((model, version), forward))

    def put(self, model: str, version: int, decoupled: bool) -> None:
        self._known[(model, version)] = decoupled

    def _lookup(self, key: tuple[str, int], forward: tuple[str, str]) -> asyncio.Task[bool]:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, forward))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        return task

    async def _load(self, key: tuple[str, int], forward: tuple[str, str]) -> bool:
        if self.fetch is None:
            return False
        try:
            answer = pb.ModelConfigResponse.FromString(await self.fetch(*forward))
        except Exception as exc:  # noqa: BLE001 - served as a tensor model until asked again
            log.debug("no model config for %s version %d: %s", key[0], key[1], exc)
            if len(self._known) < self.max_entries:
                self._known[key] = False
                asyncio.get_running_loop().call_later(self.retry_s, self._known.pop, key, None)
            return False
        decoupled = bool(answer.config.model_transaction_policy.decoupled)
        if len(self._known) < self.max_entries:
            self._known[key] = decoupled
        return decoupled
