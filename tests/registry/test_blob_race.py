"""Two registry replicas on one PostgreSQL database and one artifact directory (the documented scale-out):
one deletes the last version using some bytes while the other uploads a new version with the same bytes.
The new version's blob must survive every round (issue 12, item 4)."""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry.v1 import registry_pb2_grpc
from aiaas.registry_client import RegistryClient
from services.registry import schema
from tests.support.blobs import onnx_blob
from tests.support.procs import ServiceProcess
from tests.support.servers import PostgresServer

ROUNDS = 80
MODEL = "race"
# Each side of a round waits a random time up to this before it goes (the upload ends its stream, the delete
# is sent): the two then land on each other at a different point each round, in either order.
MAX_DELAY_S = 0.02


class Replicas:
    """Two `python -m services.registry` processes sharing a database and an artifact directory."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.dir = Path(tempfile.mkdtemp(prefix="aiaas-blob-race-"))
        self.artifact_dir = self.dir / "artifacts"
        args = ["--database-url", database_url, "--artifact-dir", str(self.artifact_dir), "--grace-period-s", "5"]
        self.processes = [ServiceProcess("registry", args=args), ServiceProcess("registry", args=args)]

    def start(self) -> Replicas:
        for process in self.processes:
            process.start(wait=False)
        for process in self.processes:
            process.wait_ready()
        return self

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def blob_path(self, sha256: str) -> Path:
        return self.artifact_dir / "sha256" / sha256[:2] / sha256[2:]

    def stored_blobs(self) -> set[str]:
        return {p.parent.name + p.name for p in (self.artifact_dir / "sha256").glob("*/*")}

    def blob_refs(self) -> tuple[dict[str, int], dict[str, int]]:
        """The references the database keeps, and the versions that use each blob, counted from scratch."""
        engine = sa.create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                kept = {str(sha): int(refs) for sha, refs in conn.execute(
                    sa.select(schema.blobs.c.sha256, schema.blobs.c.refs))}
                counted = {str(sha): int(n) for sha, n in conn.execute(
                    sa.select(schema.versions.c.sha256, sa.func.count()).group_by(schema.versions.c.sha256))}
        finally:
            engine.dispose()
        return kept, counted


@pytest.fixture(scope="module")
def replicas(postgres_server: PostgresServer) -> Iterator[Replicas]:
    running = Replicas(postgres_server.create_database("registry_blob_race")).start()
    yield running
    running.close()


def header(data: bytes) -> pb.UploadVersionHeader:
    return pb.UploadVersionHeader(
        model=MODEL, format=pb.ARTIFACT_FORMAT_ONNX, artifact_sha256=hashlib.sha256(data).hexdigest(),
        artifact_size=len(data), create_model=True, actor="racer",
        signature=pb.Signature(inputs=[pb.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
                               outputs=[pb.TensorSpec(name="y", datatype="FP32", shape=[-1, 4])]))


def held_upload(data: bytes, streamed: threading.Event, go: threading.Event,
                delay_s: float) -> Iterator[pb.UploadVersionRequest]:
    """The whole upload but its end, which comes `delay_s` after `go`: then the registry verifies and commits."""
    yield pb.UploadVersionRequest(header=header(data))
    yield pb.UploadVersionRequest(chunk=data)
    streamed.set()
    go.wait(30)
    time.sleep(delay_s)


def race(uploader: registry_pb2_grpc.ModelRegistryStub, deleter: RegistryClient, doomed: int, data: bytes,
         rng: random.Random) -> pb.UploadVersionResponse:
    """Upload `data` on one replica while the other deletes version `doomed`, which holds the same bytes."""
    streamed, go = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def delete(delay_s: float) -> None:
        go.wait(30)
        time.sleep(delay_s)
        try:
            deleter.delete_version(MODEL, doomed)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller below
            failures.append(exc)

    thread = threading.Thread(target=delete, args=(rng.uniform(0, MAX_DELAY_S),))
    thread.start()
    try:
        reply = uploader.UploadVersion.future(held_upload(data, streamed, go, rng.uniform(0, MAX_DELAY_S)),
                                              timeout=30)
        streamed.wait(30)
        go.set()
        answer = reply.result()
    finally:
        go.set()
        thread.join(30)
    assert not failures, f"deleting version {doomed} failed: {failures[0]}"
    return answer


def test_a_delete_on_one_replica_never_loses_the_blob_of_an_upload_on_another(replicas: Replicas) -> None:
    addresses = [process.address for process in replicas.processes]
    channels = [grpc.insecure_channel(address) for address in addresses]
    clients = [RegistryClient(address, actor="racer", timeout=30) for address in addresses]
    stubs = [registry_pb2_grpc.ModelRegistryStub(channel) for channel in channels]
    rng = random.Random(12)
    lost: list[int] = []
    live: dict[int, str] = {}
    # Deduplicated: the upload committed while the old version's blob was still there; not: after it was removed.
    outcomes = {True: 0, False: 0}
    try:
        for round_number in range(ROUNDS):
            # Each round with its own bytes, and the two replicas swapping roles.
            up, down = (0, 1) if round_number % 2 == 0 else (1, 0)
            data = onnx_blob(f"round {round_number}")
            sha = hashlib.sha256(data).hexdigest()
            doomed = clients[down].upload_version(MODEL, data, format="onnx",
                                                  signature={"inputs": ["x:FP32:-1,4"], "outputs": ["y:FP32:-1,4"]})
            assert replicas.blob_path(sha).is_file()
            answer = race(stubs[up], clients[down], doomed.version, data, rng)
            survivor = answer.version
            assert survivor.artifact_sha256 == sha
            outcomes[answer.deduplicated] += 1
            live[survivor.version] = sha
            if not replicas.blob_path(sha).is_file():
                lost.append(round_number)
                continue
            for index, client in enumerate(clients):
                target = replicas.dir / f"download-{round_number}-{index}.onnx"
                client.download_artifact(MODEL, survivor.version, target)
                assert hashlib.sha256(target.read_bytes()).hexdigest() == sha
                target.unlink()
        print(f"{ROUNDS} rounds: {outcomes[True]} uploads found the blob, {outcomes[False]} stored it again")
        assert not lost, (f"the new version's blob was lost in {len(lost)} of {ROUNDS} rounds (rounds {lost}); "
                          f"{outcomes[True]} uploads found the blob, {outcomes[False]} stored it again")
        listed = {v.version: v.artifact_sha256 for v in clients[0].list_versions(MODEL)}
        assert listed == live
        missing = [v for v, sha in listed.items() if not replicas.blob_path(sha).is_file()]
        assert not missing, f"live versions {missing} reference blobs missing from the artifact directory"
        # Nothing leaked either: every doomed version's blob is a survivor's, and no other file is left.
        assert replicas.stored_blobs() == set(live.values())
        kept, counted = replicas.blob_refs()
        assert kept == counted == {sha: 1 for sha in live.values()}
    finally:
        for client in clients:
            client.close()
        for channel in channels:
            channel.close()
