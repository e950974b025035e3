"""Hugging Face checkpoints as registry versions, end to end against a real registry process: the CLI and
the SDK register a tiny Llama made here, download it file by file (resumably), and the loaded copy
generates the same greedy tokens as the original; refused checkpoints leave nothing behind."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

import aiaas
from aiaas import manifest
from aiaas.cli.main import main
from aiaas.errors import InvalidArgument
from aiaas.lm import load_causal_lm
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc
from aiaas.registry_client import RegistryClient, RegistryError
from tests.lm import checkpoints
from tests.registry.service import RunningRegistry, eventually


@pytest.fixture(scope="module")
def registry() -> Iterator[RunningRegistry]:
    running = RunningRegistry("sqlite", None).start()
    yield running
    running.close()


@pytest.fixture(scope="module")
def original() -> tuple[Any, Any]:
    tok = checkpoints.tokenizer()
    return checkpoints.llama(len(tok)), tok


@pytest.fixture(scope="module")
def checkpoint(original: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.save(tmp_path_factory.mktemp("llama") / "tiny-llama", *original)


@pytest.fixture
def client(registry: RunningRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address, actor="lm-test") as sdk:
        yield sdk


def cli(capsys: pytest.CaptureFixture[str], registry: RunningRegistry, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--registry", registry.address, "--actor", "lm-test"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def blob_files(registry: RunningRegistry) -> set[Path]:
    return {p for p in registry.files() if "sha256" in p.parts}


def test_the_cli_registers_and_downloads_a_checkpoint_that_generates_the_same_tokens(
        capsys: pytest.CaptureFixture[str], registry: RunningRegistry, checkpoint: Path,
        original: tuple[Any, Any], client: RegistryClient, tmp_path: Path) -> None:
    code, out, err = cli(capsys, registry, "register", "tiny-llama", str(checkpoint), "--format", "hf-causal-lm",
                         "--alias", "production")
    assert code == 0, err
    assert out.startswith("registered tiny-llama version 1 (6 files, ")
    version = client.get_version("tiny-llama", "production")
    local, _ = manifest.scan(checkpoint)
    assert [(f.path, f.sha256, f.size) for f in version.files] == [(f.path, f.sha256, f.size) for f in local]
    assert [f.path for f in version.files] == ["chat_template.jinja", "config.json", "generation_config.json",
                                               "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (version.artifact_sha256, version.artifact_size) == manifest.digest(local)
    assert pb.ArtifactFormat.Name(version.format) == "ARTIFACT_FORMAT_HF_CAUSAL_LM"

    dest = tmp_path / "downloaded"
    code, out, err = cli(capsys, registry, "download", "tiny-llama", "production", "-o", str(dest))
    assert code == 0, err
    assert out.startswith(f"wrote {dest}/ (tiny-llama version 1, 6 files")
    assert sorted(p.name for p in dest.iterdir()) == [f.path for f in version.files]  # no partial file left
    loaded = load_causal_lm(dest)
    assert loaded.tokenizer.chat_template == checkpoints.CHAT_TEMPLATE
    assert checkpoints.greedy(loaded.model, loaded.tokenizer) == checkpoints.greedy(*original)


def test_deploy_lm_registers_a_model_and_its_tokenizer_behind_an_alias(
        registry: RunningRegistry, original: tuple[Any, Any], client: RegistryClient, tmp_path: Path) -> None:
    model, tok = original
    version = aiaas.deploy_lm(model, tok, name="deployed-llama", registry=registry.address, alias="staging",
                              metadata={"owner": "lm-team"})
    assert list(version.aliases) == ["staging"] and version.created_by
    assert version.metadata["source"] == "aiaas.deploy_lm" and version.metadata["owner"] == "lm-team"
    assert version.metadata["model_class"].endswith("LlamaForCausalLM")
    client.download_files("deployed-llama", "staging", tmp_path / "copy")
    loaded = load_causal_lm(tmp_path / "copy")
    assert checkpoints.greedy(loaded.model, loaded.tokenizer, new_tokens=6) == checkpoints.greedy(model, tok, new_tokens=6)
    with pytest.raises(InvalidArgument, match="pass tokenizer=..."):
        aiaas.deploy_lm(model, None, name="deployed-llama", registry=registry.address)


def refused_copy(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(checkpoint, copy)
    return copy


def test_a_pickled_weights_file_is_refused_naming_it_before_any_byte_is_stored(
        registry: RunningRegistry, checkpoint: Path, client: RegistryClient, tmp_path: Path) -> None:
    bad = refused_copy(checkpoint, tmp_path, "with-bin")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    stored = blob_files(registry)
    with pytest.raises(RegistryError) as caught:
        client.register("refused-llama", bad, format="hf_causal_lm")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("artifact refused: pytorch_model.bin: pickled (or non-safetensors) "
                                             "weights are refused")
    assert blob_files(registry) == stored
    assert eventually(lambda: not list((registry.artifact_dir / "tmp").iterdir()))
    with pytest.raises(RegistryError) as missing:
        client.get_model("refused-llama")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_auto_map_config_is_refused_naming_the_file_after_the_upload(
        registry: RunningRegistry, checkpoint: Path, client: RegistryClient, tmp_path: Path) -> None:
    bad = refused_copy(checkpoint, tmp_path, "with-auto-map")
    checkpoints.edit_json(bad / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    stored = blob_files(registry)
    with pytest.raises(RegistryError) as caught:
        client.register("refused-llama", bad, format="hf_causal_lm")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("artifact refused: config.json has an auto_map, which points "
                                             "transformers at code shipped with the checkpoint")
    assert caught.value.details().endswith("nothing was stored")
    assert blob_files(registry) == stored


def test_a_checkpoint_of_an_architecture_transformers_does_not_ship_as_a_decoder_is_refused(
        registry: RunningRegistry, checkpoint: Path, client: RegistryClient, tmp_path: Path) -> None:
    bad = refused_copy(checkpoint, tmp_path, "bert")
    checkpoints.edit_json(bad / "config.json", model_type="bert")
    with pytest.raises(RegistryError) as caught:
        client.register("refused-llama", bad, format="hf_causal_lm")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.json: model_type 'bert' is not a decoder-only architecture" in caught.value.details()


def stub_for(registry: RunningRegistry) -> registry_pb2_grpc.ModelRegistryStub:
    return registry_pb2_grpc.ModelRegistryStub(grpc.insecure_channel(registry.address))


def register_checkpoint(client: RegistryClient, name: str, checkpoint: Path) -> pb.ModelVersion:
    return client.register(name, checkpoint, format="hf_causal_lm")


def test_files_stream_from_a_file_and_offset_and_the_artifact_of_a_checkpoint_is_its_manifest(
        registry: RunningRegistry, checkpoint: Path, client: RegistryClient) -> None:
    version = register_checkpoint(client, "ranged-llama", checkpoint)
    stub = stub_for(registry)
    weights = (checkpoint / "model.safetensors").read_bytes()
    offset = len(weights) // 3
    replies = list(stub.DownloadFiles(pb.DownloadFilesRequest(
        model="ranged-llama", version=version.version, path="model.safetensors", offset=offset, chunk_size=65536),
        timeout=30))
    assert replies[0].WhichOneof("payload") == "version" and replies[0].version.files == version.files
    received: dict[str, bytearray] = {}
    current = ""
    for reply in replies[1:]:
        if reply.WhichOneof("payload") == "file":
            current = reply.file.path
            assert reply.file.offset == (offset if current == "model.safetensors" else 0)
            received[current] = bytearray()
        else:
            assert len(reply.chunk) <= 65536
            received[current] += reply.chunk
    assert list(received) == ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert bytes(received["model.safetensors"]) == weights[offset:]
    assert bytes(received["tokenizer.json"]) == (checkpoint / "tokenizer.json").read_bytes()

    artifact = b"".join(r.chunk for r in stub.DownloadArtifact(pb.DownloadArtifactRequest(
        model="ranged-llama", version=version.version), timeout=30) if r.WhichOneof("payload") == "chunk")
    assert hashlib.sha256(artifact).hexdigest() == version.artifact_sha256
    assert [f.path for f in manifest.decode(artifact)] == [f.path for f in version.files]
    tail = b"".join(r.chunk for r in stub.DownloadArtifact(pb.DownloadArtifactRequest(
        model="ranged-llama", version=version.version, offset=10), timeout=30) if r.WhichOneof("payload") == "chunk")
    assert tail == artifact[10:]


@pytest.mark.parametrize(("request_fields", "code", "message"), [
    ({"path": "model.bin"}, grpc.StatusCode.NOT_FOUND, "has no file 'model.bin'"),
    ({"path": "config.json", "offset": 10**9}, grpc.StatusCode.OUT_OF_RANGE, "offset 1000000000 is outside file"),
    ({"offset": 5}, grpc.StatusCode.INVALID_ARGUMENT, "an offset needs the path of the file it is in"),
    ({"chunk_size": 5 * 1024 * 1024}, grpc.StatusCode.INVALID_ARGUMENT, "chunk_size must be 0..4194304"),
])
def test_bad_file_downloads_are_refused(registry: RunningRegistry, checkpoint: Path, client: RegistryClient,
                                        request_fields: dict[str, Any], code: grpc.StatusCode, message: str) -> None:
    try:
        client.get_version("bad-ranges", 1)
    except RegistryError:
        register_checkpoint(client, "bad-ranges", checkpoint)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub_for(registry).DownloadFiles(pb.DownloadFilesRequest(model="bad-ranges", version=1,
                                                                      **request_fields), timeout=30))
    assert caught.value.code() == code
    assert message in caught.value.details()


def test_a_single_file_version_has_no_files_to_stream(registry: RunningRegistry, client: RegistryClient,
                                                      checkpoint: Path) -> None:
    client.register("plain-weights", checkpoint / "model.safetensors", format="safetensors",
                    signature={"inputs": ["x:FP32:-1,4"], "outputs": ["y:FP32:-1,2"]})
    with pytest.raises(grpc.RpcError) as caught:
        list(stub_for(registry).DownloadFiles(pb.DownloadFilesRequest(model="plain-weights", version=1), timeout=30))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is a single-file safetensors artifact; download it with DownloadArtifact" in caught.value.details()


def test_an_interrupted_download_resumes_from_its_partial_file(registry: RunningRegistry, checkpoint: Path,
                                                               client: RegistryClient, tmp_path: Path) -> None:
    version = register_checkpoint(client, "resumed-llama", checkpoint)
    total = sum(f.size for f in version.files)
    weights = (checkpoint / "model.safetensors").read_bytes()
    dest = tmp_path / "resumed"
    dest.mkdir()
    for name in ("chat_template.jinja", "config.json", "generation_config.json"):  # before the weights
        shutil.copy(checkpoint / name, dest / name)
    prefix = len(weights) // 2
    (dest / ".model.safetensors.part").write_bytes(weights[:prefix])
    seen: list[int] = []
    client.download_files("resumed-llama", version.version, dest, progress=lambda done, _: seen.append(done))
    complete = list(itertools.accumulate(f.size for f in version.files if f.path < "model.safetensors"))
    # The complete files are kept, then the partial one continues at its end: nothing before it came over the wire.
    assert seen[:4] == [*complete, complete[-1] + prefix] and seen[-1] == total
    assert manifest.scan(dest)[0] == manifest.scan(checkpoint)[0]
    assert not list(dest.glob(".*"))

    # A partial file whose bytes are wrong is caught by the file's sha256, removed, and downloaded again.
    (dest / "model.safetensors").unlink()
    (dest / ".model.safetensors.part").write_bytes(b"\0" * prefix)
    with pytest.raises(RegistryError) as caught:
        client.download_files("resumed-llama", version.version, dest)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert "downloaded file 'model.safetensors' does not match its sha256" in caught.value.details()
    assert not (dest / ".model.safetensors.part").exists()
    client.download_files("resumed-llama", version.version, dest)
    assert (dest / "model.safetensors").read_bytes() == weights


def test_empty_and_nested_files_round_trip_and_a_file_is_not_a_checkpoint(
        client: RegistryClient, checkpoint: Path, tmp_path: Path) -> None:
    source = refused_copy(checkpoint, tmp_path, "with-extras")
    (source / "README.md").write_bytes(b"")
    (source / "additional_chat_templates").mkdir()
    (source / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    version = register_checkpoint(client, "extras-llama", source)
    assert {f.path: f.size for f in version.files}["README.md"] == 0
    client.download_files("extras-llama", version.version, tmp_path / "back")
    assert manifest.scan(tmp_path / "back")[0] == manifest.scan(source)[0]
    with pytest.raises(RegistryError) as caught:
        client.register("extras-llama", checkpoint / "config.json", format="hf_causal_lm")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (f"a hf_causal_lm artifact is a checkpoint directory, and "
                                      f"{checkpoint / 'config.json'} is not one")


def test_a_download_refuses_a_directory_holding_other_files(client: RegistryClient, checkpoint: Path,
                                                            tmp_path: Path) -> None:
    register_checkpoint(client, "foreign-llama", checkpoint)
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError) as caught:
        client.download_files("foreign-llama", 1, dest)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds files that are not part of version 1 of model 'foreign-llama' (notes.txt)" in caught.value.details()


SHARING_CHILD = textwrap.dedent("""
    import sys
    import torch
    from aiaas.lm import load_causal_lm
    loaded = load_causal_lm(sys.argv[1])
    with torch.inference_mode():
        total = sum(float(p.double().sum()) for p in loaded.model.parameters())  # touch every weight page
    print("ready", flush=True)
    sys.stdin.readline()
""")


def mapped(pid: int, path: Path) -> tuple[int, int]:
    """(resident, resident and shared with another process) bytes of `path`'s mappings in process `pid`."""
    maps = [m for m in psutil.Process(pid).memory_maps(grouped=True) if m.path == str(path)]
    return sum(m.rss for m in maps), sum(m.shared_clean for m in maps)


def test_two_processes_loading_one_version_share_its_weight_pages(
        original: tuple[Any, Any], client: RegistryClient, tmp_path: Path) -> None:
    tok = original[1]
    bigger = checkpoints.llama(len(tok), seed=1, hidden_size=256, layers=4, intermediate_size=688)
    checkpoints.save(tmp_path / "bigger", bigger, tok)
    client.register("shared-llama", tmp_path / "bigger", format="hf_causal_lm")
    cache = tmp_path / "node-cache" / "shared-llama" / "1"
    client.download_files("shared-llama", 1, cache)
    weights = cache / "model.safetensors"
    size = weights.stat().st_size
    children = [subprocess.Popen([sys.executable, "-c", SHARING_CHILD, str(cache)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            resident, shared = mapped(child.pid, weights)
            print(f"weights {size} bytes: resident {resident}, shared with the other process {shared}")
            # The parameters are the file's pages (mapped, not copied), and both processes hold the same ones.
            assert resident >= 0.95 * size and shared >= 0.95 * size
    finally:
        for child in children:
            child.communicate("done\n", timeout=60)

