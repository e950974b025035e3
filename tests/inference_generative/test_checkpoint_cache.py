"""The inference service's artifact cache fetching a checkpoint (a multi-file hf_causal_lm version) from a
real registry: every file verified, the directory appears only whole, a cached copy is reused while
intact and replaced when it is not; the version's signature is the generate protocol's."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import grpc
import pytest

from aiaas import manifest
from services.common.errors import DataLoss
from services.common.registry_client import RegistryClient
from services.inference.generate_protocol import INPUTS, OUTPUTS
from services.inference.registry_source import ArtifactCache, spec_from_proto
from tests.inference_generative.conftest import Stack


async def _fetch_all(stack: Stack, cache_dir: Path) -> None:
    channel = grpc.aio.insecure_channel(stack.registry.address)
    try:
        registry = RegistryClient(channel, timeout_s=30)
        spec = spec_from_proto(await registry.get_version("tiny-llm", alias="production"))
        assert spec.generative and (spec.inputs, spec.outputs) == (INPUTS, OUTPUTS)
        assert [f.path for f in spec.files] == sorted(manifest.files_in(stack.checkpoints["tiny-llm"]))
        cache = ArtifactCache(cache_dir, registry)

        path = await cache.fetch(spec)
        assert path == cache_dir / spec.sha256 / "checkpoint"
        original = stack.checkpoints["tiny-llm"]
        for listed in spec.files:
            assert (path / listed.path).read_bytes() == (original / listed.path).read_bytes()
            assert (path / listed.path).stat().st_mode & 0o777 == 0o444
        assert sorted(os.listdir(path.parent)) == ["checkpoint"], "no staging directory is left behind"

        weights = path / "model.safetensors"
        inode = weights.stat().st_ino
        assert await cache.fetch(spec) == path
        assert weights.stat().st_ino == inode, "an intact cached checkpoint is reused as it is"

        os.chmod(weights, 0o644)
        weights.write_bytes(b"not the weights")
        assert await cache.fetch(spec) == path
        assert weights.read_bytes() == (original / "model.safetensors").read_bytes(), "a damaged copy is replaced"

        # A manifest the registry's bytes do not match: refused, and no checkpoint directory appears.
        wrong = tuple(dataclasses.replace(f, sha256="0" * 64) if f.path == "config.json" else f for f in spec.files)
        bad = dataclasses.replace(spec, files=wrong, sha256=manifest.digest(wrong)[0])
        with pytest.raises(DataLoss):
            await cache.fetch(bad)
        assert not (cache_dir / bad.sha256 / "checkpoint").exists()
        assert os.listdir(cache_dir / bad.sha256) == []
    finally:
        await channel.close()


def test_a_checkpoint_is_fetched_whole_verified_and_reused(stack: Stack, tmp_path: Path) -> None:
    asyncio.run(_fetch_all(stack, tmp_path))
