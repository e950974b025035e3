"""A checkpoint with a 2 GiB shard made on the fly (one huge tensor, its bytes a sparse file) goes up with
`aiaas register DIR --format hf-causal-lm` and comes back with `aiaas download`, in a client process of
its own, while the registry's and the client's peak resident memory stay far below the file's size.

Marked `large` (about a minute of disk IO on a busy 2-core machine): `make test-large` runs it, `make test`
does not; by hand, `pytest -m large tests/lm/test_large_checkpoint.py`."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aiaas import manifest
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc
from tests.registry.service import RunningRegistry
from tests.registry.test_upload_bounds import peak_rss

MiB = 1024 * 1024
TENSOR_BYTES = 2 * 1024 * MiB + 3  # past 2**31: offsets and sizes must not be 32-bit anywhere
# Whole-file buffering anywhere would cost at least the file (2 GiB); streaming costs a few chunks.
PEAK_GROWTH_BOUND = 256 * MiB

CLIENT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from aiaas.cli.main import main

    def peak():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    address, directory, dest = sys.argv[1:]
    before = peak()
    common = ["--registry", address, "--actor", "large-test"]
    uploaded = main(["register", "big-llama", directory, "--format", "hf-causal-lm", *common])
    after_upload = peak()
    downloaded = main(["download", "big-llama", "1", "-o", dest, *common])
    print(json.dumps({"codes": [uploaded, downloaded], "before": before, "after_upload": after_upload,
                      "after_download": peak()}))
""")


def sparse_checkpoint(directory: Path) -> Path:
    """config.json plus model.safetensors holding one uint8 tensor of TENSOR_BYTES zeros, never written out."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    header = json.dumps({"w": {"dtype": "U8", "shape": [TENSOR_BYTES], "data_offsets": [0, TENSOR_BYTES]}}).encode()
    header += b" " * (-len(header) % 8)
    with (directory / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + TENSOR_BYTES)
    return directory


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: these gigabytes go the moment the test ends, not after three more sessions.
    path = Path(tempfile.mkdtemp(prefix="aiaas-large-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[RunningRegistry]:
    running = RunningRegistry("sqlite", None).start()
    yield running
    running.close()


@pytest.mark.large
def test_a_2_gib_checkpoint_streams_up_and_down_in_bounded_memory(registry: RunningRegistry, workdir: Path) -> None:
    assert registry.process.proc is not None
    registry_pid = registry.process.proc.pid
    source = sparse_checkpoint(workdir / "big")
    weights = source / "model.safetensors"
    dest = workdir / "copy"
    registry_before = peak_rss(registry_pid)
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", CLIENT, registry.address, str(source), str(dest)],
                           check=False, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - started
    assert child.returncode == 0, child.stderr[-3000:]
    client = json.loads(child.stdout.strip().splitlines()[-1])
    assert client["codes"] == [0, 0], child.stderr[-3000:]
    registry_growth = peak_rss(registry_pid) - registry_before
    client_growth = client["after_download"] - client["before"]
    print(f"{weights.stat().st_size / MiB:.0f} MiB up and down in {elapsed:.1f} s; peak RSS growth: registry "
          f"{registry_growth / MiB:.0f} MiB, client {(client['after_upload'] - client['before']) / MiB:.0f} MiB "
          f"uploading, {client_growth / MiB:.0f} MiB after downloading too")
    assert registry_growth < PEAK_GROWTH_BOUND and client_growth < PEAK_GROWTH_BOUND

    local, _ = manifest.scan(source)
    assert manifest.scan(dest)[0] == local  # every file back, each sha256 equal (the client verified them too)
    stored = registry.artifact_dir / "sha256" / local[1].sha256[:2] / local[1].sha256[2:]
    assert local[1].path == "model.safetensors" and stored.stat().st_size == weights.stat().st_size
    (dest / "model.safetensors").unlink()

    # Resuming near the end of the file: an offset past 2**31 travels and seeks exactly.
    offset = weights.stat().st_size - MiB
    with grpc.insecure_channel(registry.address) as channel:
        replies = list(registry_pb2_grpc.ModelRegistryStub(channel).DownloadFiles(pb.DownloadFilesRequest(
            model="big-llama", version=1, path="model.safetensors", offset=offset), timeout=120))
    assert replies[1].file == pb.FileStart(path="model.safetensors", offset=offset)
    tail = b"".join(r.chunk for r in replies[2:])
    assert len(tail) == MiB and tail == b"\0" * MiB
