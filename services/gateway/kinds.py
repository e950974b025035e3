"""Which versions are decoupled (generative) models, learnt from inference's `ModelConfig`
(`model_transaction_policy.decoupled`) once per version and cached, like signatures.

`known` answers from the cache at once (None when not known yet, starting the lookup in the
background); `decoupled` waits for the lookup (one per version at a time, however many callers ask).
A lookup that fails (no replica has loaded the version yet, say) is not cached: the answer is None
("unknown"), and the version is asked again once `retry_s` has passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tritonclient.grpc import service_pb2 as pb

from services.gateway.merging import MergePlan

log = logging.getLogger("aiaas.gateway.kinds")

# Asks inference for a ModelConfig (forwarded model name, version) and answers the serialized response.
FetchConfig = Callable[[str, str], Awaitable[bytes]]


class ModelKinds:
    def __init__(self, fetch: FetchConfig | None, *, max_entries: int = 10_000, retry_s: float = 1.0) -> None:
        self.fetch = fetch
        self.max_entries = max_entries
        self.retry_s = retry_s
        self._known: dict[tuple[str, int], bool] = {}
        # Whether (and how) a version's ModelInfer requests may merge (see merging.py), from the same config.
        self._plans: dict[tuple[str, int], MergePlan | None] = {}
        # Versions whose lookup failed, and when they may be asked again.
        self._failed: dict[tuple[str, int], float] = {}
        self._pending: dict[tuple[str, int], asyncio.Task[bool | None]] = {}

    def known(self, model: str, version: int, forward: tuple[str, str]) -> bool | None:
        """Whether the version is decoupled, from the cache; None (and a lookup started) when unknown."""
        key = (model, version)
        found = self._known.get(key)
        if found is None and self._may_ask(key):
            self._lookup(key, forward)
        return found

    async def decoupled(self, model: str, version: int, forward: tuple[str, str]) -> bool | None:
        """Whether the version is decoupled, asking inference the first time; None when it cannot tell."""
        key = (model, version)
        found = self._known.get(key)
        if found is not None:
            return found
        if not self._may_ask(key):
            return None
        return await asyncio.shield(self._lookup(key, forward))

    def plan(self, model: str, version: int) -> MergePlan | None:
        """How the version's requests may merge, once its config is known (None: they never do)."""
        return self._plans.get((model, version))

    def put(self, model: str, version: int, decoupled: bool, plan: MergePlan | None = None) -> None:
        self._known[(model, version)] = decoupled
        self._plans[(model, version)] = plan

    def _may_ask(self, key: tuple[str, int]) -> bool:
        if self.fetch is None:
            return False
        retry_at = self._failed.get(key)
        return retry_at is None or time.monotonic() >= retry_at

    def _lookup(self, key: tuple[str, int], forward: tuple[str, str]) -> asyncio.Task[bool | None]:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, forward))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        return task

    async def _load(self, key: tuple[str, int], forward: tuple[str, str]) -> bool | None:
        if self.fetch is None:
            return None
        try:
            answer = pb.ModelConfigResponse.FromString(await self.fetch(*forward))
        except Exception as exc:  # noqa: BLE001 - unknown for now; asked again after retry_s
            log.debug("no model config for %s version %d: %s", key[0], key[1], exc)
            if len(self._failed) >= self.max_entries:
                self._failed.clear()
            self._failed[key] = time.monotonic() + self.retry_s
            return None
        self._failed.pop(key, None)
        decoupled = bool(answer.config.model_transaction_policy.decoupled)
        if len(self._known) < self.max_entries:
            self._known[key] = decoupled
            self._plans[key] = MergePlan.from_config(answer.config)
        return decoupled
