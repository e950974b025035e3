"""Follows the registry's `WatchModels` feed and tells the repository where followed aliases point.

Starts from revision 0 (a snapshot, then live events), resumes from the last revision seen after
a disconnect (reconnecting with exponential backoff), and restarts from a fresh snapshot when
the registry answers FAILED_PRECONDITION ("resync required").
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.inference.repository import ModelRepository

log = logging.getLogger("aiaas.inference.follower")

_E = registry_pb2.ChangeEventType


class AliasFollower:
    def __init__(self, channel: grpc.aio.Channel, repository: ModelRepository, *, aliases: tuple[str, ...],
                 models: tuple[str, ...] = (), backoff_min_s: float = 0.2, backoff_max_s: float = 10.0) -> None:
        self._stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self._repo = repository
        self._aliases = frozenset(aliases)
        self._models = tuple(models)
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self.revision = 0
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._snapshot: dict[tuple[str, str], int] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-follower")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = self._backoff_min_s
        while True:
            try:
                await self._watch_once()
                backoff = self._backoff_min_s
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning("registry feed asks for a resync: %s", exc.details())
                    self.revision = 0
                    backoff = self._backoff_min_s
                    continue
                log.warning("registry feed lost (%s: %s); reconnecting in %.1fs",
                            exc.code().name, exc.details(), backoff)
            except Exception:
                log.exception("registry feed failed; reconnecting in %.1fs", backoff)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self._backoff_max_s, backoff * 2)

    async def _watch_once(self) -> None:
        request = registry_pb2.WatchModelsRequest(after_revision=self.revision, models=self._models)
        self._snapshot = {} if self.revision == 0 else None
        call = self._stub.WatchModels(request)
        try:
            async for message in call:
                self._apply(message.event)
        finally:
            call.cancel()

    def _apply(self, event: registry_pb2.ChangeEvent) -> None:
        kind = event.type
        if event.snapshot and self._snapshot is not None:
            if kind == _E.CHANGE_EVENT_TYPE_ALIAS_MOVED and event.alias in self._aliases and event.version:
                self._snapshot[(event.model, event.alias)] = event.version
            self.revision = max(self.revision, event.revision)
            return
        if kind == _E.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
            if self._snapshot is not None:
                self._repo.replace_alias_targets(self._snapshot)
                self._snapshot = None
            self.revision = max(self.revision, event.revision)
            self.synced.set()
            return
        if kind == _E.CHANGE_EVENT_TYPE_ALIAS_MOVED and event.alias in self._aliases:
            if event.version:
                self._repo.set_alias_target(event.model, event.alias, event.version)
            else:
                self._repo.remove_alias_target(event.model, event.alias)
        elif kind == _E.CHANGE_EVENT_TYPE_ALIAS_DELETED and event.alias in self._aliases:
            self._repo.remove_alias_target(event.model, event.alias)
        elif kind == _E.CHANGE_EVENT_TYPE_MODEL_DELETED:
            for alias in self._aliases:
                self._repo.remove_alias_target(event.model, alias)
        if event.revision:
            self.revision = max(self.revision, event.revision)
        if self._snapshot is None:
            # Resumed without a snapshot: the state we hold is already complete.
            self.synced.set()
