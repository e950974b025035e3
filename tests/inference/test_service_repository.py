"""ModelRepository (the core, no grpc): routing, loads, drains and swaps, deterministic with gated executors."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from aiaas.serving import ServingConfig
from aiaas.tensors import TensorSpec
from services.common.errors import Internal, InvalidArgument, NotFound, Unavailable
from services.inference.core import LoadedVersion
from services.inference.entities import Outcome, VersionSpec, VersionState
from services.inference.repository import ModelRepository

SPEC_IN = (TensorSpec("x", "FP32", (-1, 2)),)
SPEC_OUT = (TensorSpec("y", "FP32", (-1, 2)),)


class GatedExecutor:
    """Answers with its version number; `gate` holds every request until set."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed = False
        self.calls = 0

    async def start(self) -> None:
        return None

    async def infer(self, inputs: dict[str, np.ndarray], *, priority: int, timeout_us: int | None) -> Outcome:
        self.calls += 1
        await self.gate.wait()
        if self.closed:
            raise Unavailable("closed")
        return Outcome({"y": np.full((1, 2), self.version, np.float32)}, batch_size=1)

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


class FakeLoader:
    """Versions 1..9 of any model; `block` holds loads of a version until released; `fail` makes them fail."""

    def __init__(self) -> None:
        self.executors: dict[tuple[str, int], GatedExecutor] = {}
        self.block: dict[int, asyncio.Event] = {}
        self.fail: set[int] = set()
        self.aliases: dict[tuple[str, str], int] = {}

    async def describe(self, model: str, version: int, alias: str) -> VersionSpec:
        if not version:
            version = self.aliases.get((model, alias), 9)
        if not 1 <= version <= 9:
            raise NotFound(f"{model} version {version}")
        return VersionSpec(model, version, "torchscript", SPEC_IN, SPEC_OUT, ServingConfig(max_batch_size=4))

    async def open(self, spec: VersionSpec, lv: LoadedVersion) -> GatedExecutor:
        gate = self.block.get(spec.version)
        if gate is not None:
            await gate.wait()
        if spec.version in self.fail:
            raise Internal(f"cannot load version {spec.version}")
        executor = self.executors[(spec.model, spec.version)] = GatedExecutor(spec.version)
        return executor


async def infer(repo: ModelRepository, model: str = "m", version: str = "") -> float:
    lv = repo.resolve(model, version)
    outcome = await lv.infer({"x": np.zeros((1, 2), np.float32)}, 1)
    return float(outcome.outputs["y"][0, 0])


async def settle(repo: ModelRepository, predicate: Any, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


@pytest.fixture()
def loader() -> FakeLoader:
    return FakeLoader()


async def test_resolve_errors(loader: FakeLoader) -> None:
    repo = ModelRepository(loader)
    with pytest.raises(NotFound):
        repo.resolve("m", "")
    await repo.load("m", 2)
    assert await infer(repo) == 2
    assert await infer(repo, version="2") == 2
    with pytest.raises(NotFound):
        repo.resolve("m", "3")
    for bad in ("x", "0", "-1", "1.5"):
        with pytest.raises(InvalidArgument):
            repo.resolve("m", bad)
    with pytest.raises(NotFound):
        repo.resolve("m:canary", "")
    await repo.close()


async def test_alias_swap_waits_for_ready_then_drains_the_old_version(loader: FakeLoader) -> None:
    repo = ModelRepository(loader)
    repo.set_alias_target("m", "production", 1)
    await settle(repo, lambda: repo.routes("m") == {"production": 1})
    assert await infer(repo) == 1

    old = loader.executors[("m", 1)]
    base = old.calls
    old.gate.clear()  # a request in flight on version 1 during the swap
    in_flight = asyncio.create_task(infer(repo))
    await settle(repo, lambda: old.calls == base + 1)

    loader.block[2] = asyncio.Event()
    repo.set_alias_target("m", "production", 2)
    await settle(repo, lambda: ("m", 2) in {(e.model, e.version) for e in repo.index()})
    assert repo.routes("m") == {"production": 1}  # loading: the old version keeps serving
    old.gate.set()
    assert await in_flight == 1
    old.gate.clear()
    second = asyncio.create_task(infer(repo))
    await settle(repo, lambda: old.calls == base + 2)

    loader.block[2].set()
    await settle(repo, lambda: repo.routes("m") == {"production": 2})
    assert await infer(repo) == 2
    assert await infer(repo, "m:production") == 2  # the gateway forwards aliases this way
    await asyncio.sleep(0.05)
    assert not old.closed  # still draining the request that resolved it before the switch
    assert [e.state for e in repo.index() if e.version == 1] == ["UNLOADING"]
    old.gate.set()
    assert await second == 1
    await settle(repo, lambda: old.closed and [e.version for e in repo.index()] == [2])
    await repo.close()


async def test_failed_load_keeps_the_old_version_and_retries(loader: FakeLoader) -> None:
    repo = ModelRepository(loader, retry_min_s=0.05, retry_max_s=0.1)
    repo.set_alias_target("m", "production", 1)
    await settle(repo, lambda: repo.routes("m") == {"production": 1})
    loader.fail.add(2)
    repo.set_alias_target("m", "production", 2)
    await settle(repo, lambda: any(e.version == 2 and e.state == "UNAVAILABLE" for e in repo.index()))
    assert await infer(repo) == 1
    with pytest.raises(Unavailable):
        repo.resolve("m", "2")
    loader.fail.clear()
    await settle(repo, lambda: repo.routes("m") == {"production": 2})
    assert await infer(repo) == 2
    await repo.close()


async def test_explicit_load_pins_and_unload_suspends_following(loader: FakeLoader) -> None:
    repo = ModelRepository(loader)
    loader.aliases[("m", "production")] = 3
    lv = await repo.load("m")  # the default alias's version
    assert lv.version == 3
    await repo.load("m", 5)
    assert sorted(v.version for v in repo.ready_versions("m")) == [3, 5]
    assert await infer(repo) == 5  # no routed alias: the highest ready version
    repo.set_alias_target("m", "production", 4)
    await settle(repo, lambda: repo.routes("m") == {"production": 4})
    assert await infer(repo) == 4
    assert sorted(v.version for v in repo.ready_versions("m")) == [3, 4, 5]  # pins stay

    await repo.unload("m", 5)
    assert sorted(v.version for v in repo.ready_versions("m")) == [3, 4]
    await repo.unload("m")
    assert repo.ready_versions("m") == []
    with pytest.raises(NotFound):
        repo.resolve("m", "")
    with pytest.raises(InvalidArgument):
        await repo.unload("m")
    await repo.load("m", 4)  # loading again resumes following
    await settle(repo, lambda: repo.routes("m") == {"production": 4})
    await repo.close()


async def test_snapshot_replaces_targets(loader: FakeLoader) -> None:
    repo = ModelRepository(loader)
    repo.set_alias_target("a", "production", 1)
    repo.set_alias_target("b", "production", 1)
    await settle(repo, lambda: repo.routes("a") and repo.routes("b"))
    repo.replace_alias_targets({("a", "production"): 2})
    await settle(repo, lambda: repo.routes("a") == {"production": 2} and not [e for e in repo.index() if e.model == "b"])
    await repo.close()


async def test_state_listener_and_statistics(loader: FakeLoader) -> None:
    repo = ModelRepository(loader)
    seen: list[tuple[str, int, bool]] = []
    repo.add_listener(lambda model, version, ready: seen.append((model, version, ready)))
    await repo.load("m", 1)
    for _ in range(3):
        await infer(repo)
    lv = repo.resolve("m", "1")
    assert (lv.stats.success_count, lv.stats.inference_count) == (3, 3)
    assert lv.state is VersionState.READY
    await repo.unload("m")
    assert seen[0] == ("m", 1, True) and seen[-1] == ("m", 1, False)
    await repo.close()
