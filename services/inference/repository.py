"""The set of versions this replica serves, the alias routing table, loads, unloads and hot swaps.

What is served per model is the union of explicit loads ("pins") and the versions that followed
aliases point at ("targets", fed by the registry's change feed). One reconciler task per model
moves the loaded state toward that: it loads and warms a new version while the old one keeps
serving, routes the alias to it only once it is READY, then drains the old version's in-flight
requests before closing it. No grpc here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from services.common.errors import AiaasError, InvalidArgument, NotFound, Unavailable
from services.inference.core import LoadedVersion
from services.inference.entities import Executor, RequestObserver, VersionSpec, VersionState

log = logging.getLogger("aiaas.inference.repository")

StateListener = Callable[[str, int, bool], None]


class VersionLoader(Protocol):
    """Where versions come from: the registry, or a Triton server for delegated models."""

    async def describe(self, model: str, version: int, alias: str) -> VersionSpec:
        """The version's spec; `version` 0 means the one `alias` points at (or the latest)."""
        ...

    async def open(self, spec: VersionSpec, lv: LoadedVersion) -> Executor:
        """Fetch, load and warm the version; return a started executor."""
        ...


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    model: str
    version: int
    state: str
    reason: str = ""


class _ModelSlot:
    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[int, LoadedVersion] = {}
        self.routes: dict[str, int] = {}  # alias -> READY version serving it
        self.targets: dict[str, int] = {}  # alias -> version the registry points it at
        self.pins: set[int] = set()
        self.loading: dict[int, asyncio.Task[LoadedVersion]] = {}
        self.suspended = False  # explicitly unloaded: stop following until explicitly loaded
        self.lock = asyncio.Lock()
        self.dirty = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.backoff_s = 0.0

    def wanted(self) -> set[int]:
        wanted = set(self.pins) | set(self.routes.values())
        if not self.suspended:
            wanted |= set(self.targets.values())
        return wanted


class ModelRepository:
    def __init__(self, loader: VersionLoader, *, default_alias: str = "production",
                 loaders: Mapping[str, VersionLoader] | None = None, drain_timeout_s: float = 60.0,
                 retry_min_s: float = 0.5, retry_max_s: float = 30.0,
                 observer: RequestObserver | None = None) -> None:
        self._loader = loader
        self._loaders = dict(loaders or {})
        self.default_alias = default_alias
        self.drain_timeout_s = drain_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.observer = observer
        self._slots: dict[str, _ModelSlot] = {}
        self._cache: dict[tuple[str, str], LoadedVersion] = {}
        self._listeners: list[StateListener] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- serving path ----------------------------------------------------------------------

    def resolve(self, model: str, version: str) -> LoadedVersion:
        """The READY version a request goes to. Raises NotFound / Unavailable / InvalidArgument."""
        lv = self._cache.get((model, version))
        if lv is not None and lv.state is VersionState.READY:
            return lv
        lv = self._resolve_slow(model, version)
        self._cache[(model, version)] = lv
        return lv

    def _resolve_slow(self, model: str, version: str) -> LoadedVersion:
        name, _, alias = model.partition(":")
        slot = self._slots.get(name)
        if slot is None or not (slot.versions or slot.loading):
            raise NotFound(f"Request for unknown model: '{model}' is not found")
        if version:
            if alias:
                raise InvalidArgument(f"model '{model}': give either an alias or a version, not both")
            number = parse_version(version)
            lv = slot.versions.get(number)
            if lv is None:
                raise NotFound(f"Request for unknown model: '{name}' version {number} is not found")
        else:
            routed = slot.routes.get(alias or self.default_alias)
            if alias and routed is None:
                if alias in slot.targets and not slot.suspended:
                    raise Unavailable(f"model '{name}': version {slot.targets[alias]} for alias '{alias}' is loading")
                raise NotFound(f"Request for unknown model: alias '{alias}' of '{name}' is not served here")
            if routed is None:
                ready = [v for v, candidate in slot.versions.items() if candidate.ready]
                if not ready:
                    states = ", ".join(f"{v}: {lv.state.value}" for v, lv in sorted(slot.versions.items()))
                    raise Unavailable(f"model '{name}' has no ready version ({states or 'loading'})")
                routed = max(ready)
            lv = slot.versions[routed]
        if not lv.ready:
            detail = f": {lv.reason}" if lv.reason else ""
            raise Unavailable(f"model '{name}' version {lv.version} is not ready ({lv.state.value}{detail})")
        return lv

    def find(self, model: str, version: str) -> LoadedVersion:
        """Like `resolve`, for metadata calls."""
        return self.resolve(model, version)

    # ---- queries -----------------------------------------------------------------------------

    def ready_versions(self, model: str | None = None) -> list[LoadedVersion]:
        slots = self._slots.values() if model is None else [s for s in (self._slots.get(model),) if s]
        return [lv for slot in slots for _, lv in sorted(slot.versions.items()) if lv.ready]

    def known(self, model: str) -> bool:
        slot = self._slots.get(model.partition(":")[0])
        return slot is not None and bool(slot.versions or slot.loading)

    def index(self) -> list[IndexEntry]:
        entries = []
        for name in sorted(self._slots):
            slot = self._slots[name]
            for version, lv in sorted(slot.versions.items()):
                entries.append(IndexEntry(name, version, lv.state.value, lv.reason))
        return entries

    def routes(self, model: str) -> dict[str, int]:
        slot = self._slots.get(model)
        return dict(slot.routes) if slot else {}

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    # ---- explicit control ----------------------------------------------------------------------

    async def load(self, model: str, version: int = 0, alias: str = "") -> LoadedVersion:
        """Load (and pin) a version; by default the one `default_alias` points at, else the latest."""
        loader = self._loader_for(model)
        spec = await loader.describe(model, version, alias or self.default_alias)
        slot = self._slot(model)
        slot.pins.add(spec.version)
        slot.suspended = False
        try:
            lv = await self._ensure_loaded(slot, spec.version, spec)
        except BaseException:
            slot.pins.discard(spec.version)
            raise
        self._kick(slot)
        return lv

    async def unload(self, model: str, version: int = 0) -> None:
        """Unload one version or the whole model; a followed model stays unloaded until loaded again."""
        slot = self._slots.get(model)
        if slot is None or not (slot.versions or slot.loading):
            raise InvalidArgument(f"failed to unload '{model}': the model is not loaded")
        if version:
            if version not in slot.versions:
                raise InvalidArgument(f"failed to unload '{model}' version {version}: it is not loaded")
            slot.pins.discard(version)
            if version in slot.targets.values() or version in slot.routes.values():
                slot.suspended = True
        else:
            slot.pins.clear()
            slot.suspended = True
        if slot.suspended:
            slot.routes.clear()
            self._changed()
        for task in list(slot.loading.values()):
            await asyncio.gather(task, return_exceptions=True)
        async with slot.lock:
            await self._retire_unwanted(slot, wait=True)

    # ---- following aliases (fed by the registry feed) ----------------------------------------

    def set_alias_target(self, model: str, alias: str, version: int) -> None:
        slot = self._slot(model)
        if slot.targets.get(alias) != version:
            slot.targets[alias] = version
            self._kick(slot)

    def remove_alias_target(self, model: str, alias: str) -> None:
        slot = self._slots.get(model)
        if slot is not None and alias in slot.targets:
            del slot.targets[alias]
            self._kick(slot)

    def replace_alias_targets(self, targets: Mapping[tuple[str, str], int]) -> None:
        """After a snapshot: the complete set of followed alias targets."""
        for (model, alias), version in targets.items():
            self.set_alias_target(model, alias, version)
        for name, slot in list(self._slots.items()):
            for alias in list(slot.targets):
                if (name, alias) not in targets:
                    self.remove_alias_target(name, alias)

    async def settle(self) -> None:
        """Run one reconcile pass of every model now (start-up readiness waits on this)."""
        await asyncio.gather(*(self._reconcile(slot) for slot in list(self._slots.values())))

    # ---- internals ------------------------------------------------------------------------------

    def _loader_for(self, model: str) -> VersionLoader:
        return self._loaders.get(model, self._loader)

    def _slot(self, model: str) -> _ModelSlot:
        slot = self._slots.get(model)
        if slot is None:
            slot = self._slots[model] = _ModelSlot(model)
        return slot

    def _changed(self, lv: LoadedVersion | None = None) -> None:
        self._cache.clear()
        if lv is not None:
            for listener in self._listeners:
                listener(lv.model, lv.version, lv.ready)

    def _kick(self, slot: _ModelSlot) -> None:
        if self._closed:
            return
        slot.dirty.set()
        if slot.task is None or slot.task.done():
            slot.task = asyncio.get_running_loop().create_task(self._follow(slot), name=f"reconcile:{slot.name}")

    async def _follow(self, slot: _ModelSlot) -> None:
        while not self._closed:
            await slot.dirty.wait()
            slot.dirty.clear()
            try:
                ok = await self._reconcile(slot)
            except Exception:  # keep reconciling this model, after a pause
                log.exception("reconciling %s failed", slot.name)
                ok = False
            if ok:
                slot.backoff_s = 0.0
                continue
            slot.backoff_s = min(self.retry_max_s, max(self.retry_min_s, slot.backoff_s * 2))
            try:
                await asyncio.wait_for(slot.dirty.wait(), slot.backoff_s)
            except TimeoutError:
                slot.dirty.set()

    async def _reconcile(self, slot: _ModelSlot) -> bool:
        """One pass; returns False when some target failed to load (retried with backoff)."""
        async with slot.lock:
            ok = True
            if not slot.suspended:
                for alias, version in list(slot.targets.items()):
                    try:
                        await self._ensure_loaded(slot, version)
                    except Exception as exc:  # noqa: BLE001 - the old version keeps serving; retried
                        ok = False
                        log.warning("loading %s version %d for alias %s failed: %s", slot.name, version, alias, exc)
                        continue
                    if slot.targets.get(alias) == version and slot.routes.get(alias) != version:
                        previous = slot.routes.get(alias)
                        slot.routes[alias] = version
                        self._changed()
                        log.info("alias %s of %s now serves version %d (was %s)", alias, slot.name, version, previous)
            for alias in [a for a in slot.routes if slot.suspended or a not in slot.targets]:
                del slot.routes[alias]
                self._changed()
            await self._retire_unwanted(slot, wait=False)
            return ok

    async def _ensure_loaded(self, slot: _ModelSlot, version: int, spec: VersionSpec | None = None) -> LoadedVersion:
        lv = slot.versions.get(version)
        if lv is not None and lv.ready:
            return lv
        task = slot.loading.get(version)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_version(slot, version, spec))
            slot.loading[version] = task
            task.add_done_callback(functools.partial(_forget_load, slot, version))
        return await asyncio.shield(task)

    async def _load_version(self, slot: _ModelSlot, version: int, spec: VersionSpec | None) -> LoadedVersion:
        loader = self._loader_for(slot.name)
        if spec is None:
            spec = await loader.describe(slot.name, version, "")
        lv = LoadedVersion(spec, self.observer)
        slot.versions[version] = lv
        self._changed()
        log.info("loading %s version %d (%s)", slot.name, version, spec.format)
        try:
            lv.executor = await loader.open(spec, lv)
        except BaseException as exc:
            lv.state = VersionState.UNAVAILABLE
            lv.reason = exc.message if isinstance(exc, AiaasError) else f"{type(exc).__name__}: {exc}"
            self._changed(lv)
            raise
        if self._closed or slot.versions.get(version) is not lv:
            await lv.drain_and_close(self.drain_timeout_s)
            raise Unavailable(f"model '{slot.name}' version {version} was unloaded while loading")
        lv.state = VersionState.READY
        self._changed(lv)
        log.info("%s version %d is ready", slot.name, version)
        return lv

    async def _retire_unwanted(self, slot: _ModelSlot, *, wait: bool) -> None:
        wanted = slot.wanted()
        tasks = []
        for version, lv in list(slot.versions.items()):
            if version in wanted or version in slot.loading or lv.state is VersionState.DRAINING:
                continue
            task = asyncio.get_running_loop().create_task(self._retire(slot, lv))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            tasks.append(task)
        if wait and tasks:
            await asyncio.gather(*tasks)

    async def _retire(self, slot: _ModelSlot, lv: LoadedVersion) -> None:
        was_ready = lv.ready
        lv.state = VersionState.DRAINING
        self._changed(lv)
        if was_ready:
            log.info("draining %s version %d (%d in flight)", lv.model, lv.version, lv.in_flight)
        try:
            drained = await lv.drain_and_close(self.drain_timeout_s)
            if not drained:
                log.warning("%s version %d: drain timed out after %.0fs", lv.model, lv.version, self.drain_timeout_s)
        except Exception:
            log.exception("closing %s version %d failed", lv.model, lv.version)
        finally:
            if slot.versions.get(lv.version) is lv:
                del slot.versions[lv.version]
                self._changed()
        log.info("unloaded %s version %d", lv.model, lv.version)

    async def close(self) -> None:
        """Drain and close everything (shutdown)."""
        self._closed = True
        for slot in self._slots.values():
            if slot.task is not None:
                slot.task.cancel()
        for slot in self._slots.values():
            for task in list(slot.loading.values()):
                await asyncio.gather(task, return_exceptions=True)
            slot.pins.clear()
            slot.targets.clear()
            slot.routes.clear()
            await self._retire_unwanted(slot, wait=True)
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)


def _forget_load(slot: _ModelSlot, version: int, _task: asyncio.Task[LoadedVersion]) -> None:
    slot.loading.pop(version, None)


def parse_version(version: str) -> int:
    try:
        number = int(version)
    except ValueError:
        number = -1
    if number <= 0 or not version.isdigit():
        raise InvalidArgument(f"model version must be a positive integer, got '{version}'")
    return number

