"""Follows the registry's `WatchModels` feed and tells the repository where followed aliases point.

The stream handling (snapshot staged until SNAPSHOT_DONE, resume from the last applied revision,
resync on FAILED_PRECONDITION, backoff, metrics, warnings) is `services.common.feed_follower`;
this module only turns events into alias targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc

from aiaas.registry.v1 import registry_pb2
from services.common.feed_follower import FeedFollower

_E = registry_pb2.ChangeEventType


class AliasTargets(Protocol):
    """What the follower drives (services.inference.repository.ModelRepository)."""

    def set_alias_target(self, model: str, alias: str, version: int) -> None: ...

    def remove_alias_target(self, model: str, alias: str) -> None: ...

    def replace_alias_targets(self, targets: Mapping[tuple[str, str], int]) -> None: ...


class AliasFollower(FeedFollower):
    def __init__(self, channel: grpc.aio.Channel, repository: AliasTargets, *, aliases: tuple[str, ...],
                 models: tuple[str, ...] = (), backoff_min_s: float = 0.2, backoff_max_s: float = 10.0,
                 address: str = "") -> None:
        super().__init__(channel, name="inference", on_snapshot=self._apply_snapshot, on_event=self._apply,
                         models=models, backoff_min_s=backoff_min_s, backoff_max_s=backoff_max_s, address=address)
        self._repo = repository
        self._aliases = frozenset(aliases)

    def _apply_snapshot(self, revision: int, events: Sequence[registry_pb2.ChangeEvent]) -> None:
        targets = {(e.model, e.alias): e.version for e in events
                   if e.type == _E.CHANGE_EVENT_TYPE_ALIAS_MOVED and e.alias in self._aliases and e.version}
        self._repo.replace_alias_targets(targets)

    def _apply(self, event: registry_pb2.ChangeEvent) -> None:
        kind = event.type
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
