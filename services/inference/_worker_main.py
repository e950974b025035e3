"""The body of a model worker process: `python -m services.inference._worker_main FD`.

The service starts it as a fresh interpreter (never a fork of the service, and without
multiprocessing's re-import of the service's main module), hands it a socket as FD, and sends
the `WorkerConfig` as the first message, in plain values only.

While it is still one thread and has imported nothing heavy, the worker confines itself
(`sandbox.apply`: limits, no network, an unprivileged user, Landlock); only then does it import
numpy, torch or onnxruntime and load the model. It serves one batch at a time: inputs are read in
place from the input slab, outputs are written to the output slab, and only small control tuples
cross the pipe. Slabs arrive as descriptors (see `shm`); when outputs do not fit, the worker asks
the service for a bigger output slab and waits for it.

A generative model (format hf_causal_lm) is served by `_generative_worker` instead, with several
requests in flight and JSON chunks back.

Messages in (JSON, `_worker_replies.read_message`: nothing on this wire is pickled either way):
              the config (a dict), then
              ["run", in_slab, out_slab, input_metas, fresh_slab_names] + their descriptors
              ["out", name] + its descriptor | ["refuse", message]     answers ["grow", nbytes]
              ["stop"]
Messages out (JSON: the service never unpickles what a worker running model code sends):
              ["ready", pid, sandbox_report] | ["error", code, message]      after loading
              ["grow", nbytes]
              ["ok", output_metas, in_ns, infer_ns, out_ns] | ["fail", code, message]
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

# The loader lives in the client package (`aiaas.runtime`): take it from where this process finds
# `services` (PYTHONPATH first, see workers._worker_env), now, while that directory can be listed.
# The package itself is light (its names load lazily); the sandbox lets the worker read it.
import aiaas  # noqa: F401
from services.inference import sandbox
from services.inference._worker_replies import read_message

if TYPE_CHECKING:
    from aiaas.runtime import LoadedModel, TensorSig
    from services.inference.shm import MappedSlab


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    artifact_path: str
    format: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    device: str
    threads: int
    sandbox: sandbox.SandboxPolicy = dataclasses.field(default_factory=sandbox.SandboxPolicy)
    # A generative model's `EngineConfig` fields (format hf_causal_lm; see `_generative_worker`).
    engine: dict[str, Any] | None = None

    def message(self) -> dict[str, Any]:
        """Builtins only: the worker reads it before it may import numpy or the loaders."""
        return {
            "artifact_path": self.artifact_path,
            "format": self.format,
            "inputs": [(s.name, s.datatype, tuple(s.shape)) for s in self.inputs],
            "outputs": [(s.name, s.datatype, tuple(s.shape)) for s in self.outputs],
            "device": self.device,
            "threads": self.threads,
            "sandbox": dataclasses.asdict(self.sandbox),
            "engine": dict(self.engine) if self.engine is not None else None,
        }


def reply(conn: Connection, *fields: Any) -> None:
    conn.send_bytes(json.dumps(fields).encode())


def _service_owns_shared_memory() -> None:
    """The service creates and unlinks every segment; a tracker here must never unlink one."""
    from multiprocessing import resource_tracker

    def untracked(name: str, rtype: str) -> None:
        return None

    resource_tracker.register = untracked  # type: ignore[assignment]
    resource_tracker.unregister = untracked  # type: ignore[assignment]


def worker_main(conn: Connection, config: dict[str, Any], report: sandbox.SandboxReport) -> None:
    from aiaas.runtime import TensorSig, load_model
    from services.common.errors import AiaasError

    _service_owns_shared_memory()
    artifact = config["artifact_path"]
    path = report.paths.get(artifact, artifact)
    try:
        if config["format"] != "onnx":  # an ONNX worker never needs torch's memory or start-up time
            import torch

            torch.set_num_threads(config["threads"])
            try:  # only settable before any parallel work
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass
        model = load_model(
            path,
            config["format"],
            tuple(TensorSig(name, datatype, tuple(shape)) for name, datatype, shape in config["inputs"]),
            tuple(TensorSig(name, datatype, tuple(shape)) for name, datatype, shape in config["outputs"]),
            device=config["device"],
            threads=config["threads"],
        )
    except AiaasError as exc:
        reply(conn, "error", exc.code.value, exc.message.replace(path, artifact))
        return
    except Exception as exc:  # noqa: BLE001 - the loader's own message is what the operator needs
        message = f"cannot load model: {type(exc).__name__}: {exc}".replace(path, artifact)
        reply(conn, "error", "failed_precondition", message)
        return
    if path != artifact:
        os.close(int(path.rsplit("/", 1)[1]))  # loaded: the descriptor kept for it is done
    reply(conn, "ready", os.getpid(), report.as_dict())
    _serve(conn, model)


def _serve(conn: Connection, model: LoadedModel) -> None:
    from services.common.errors import AiaasError
    from services.inference.shm import MappedSlab, Packed, receive_fds, views

    sock = socket.socket(fileno=os.dup(conn.fileno()))
    slabs: dict[str, MappedSlab] = {}  # the current input and output slabs, by name
    while True:
        try:
            message = read_message(conn)
            if message[0] != "run":
                return
            _, in_name, out_name, metas, fresh = message
            for name, fd in zip(fresh, receive_fds(sock, len(fresh)) if fresh else [], strict=True):
                slabs[name] = MappedSlab(name, fd)
            _keep(slabs, (in_name, out_name))
        except (EOFError, OSError, ValueError):
            return  # the service went away
        try:
            outputs, in_ns, infer_ns, out_ns = model.run(views(slabs[in_name].buf, metas))
            started = time.perf_counter_ns()
            packed = Packed(outputs)
            del outputs
            if packed.nbytes > slabs[out_name].size:
                out_name = _bigger_out_slab(conn, sock, slabs, out_name, packed.nbytes)
                if not out_name:
                    return
            out_metas = packed.write(slabs[out_name].buf)
            del packed
            answer: tuple[Any, ...] = ("ok", out_metas, in_ns, infer_ns, out_ns + time.perf_counter_ns() - started)
        except AiaasError as exc:
            answer = ("fail", exc.code.value, exc.message)
        except Exception as exc:  # noqa: BLE001 - reported to the service as the batch's error
            answer = ("fail", "internal", f"model execution failed: {type(exc).__name__}: {exc}")
        reply(conn, *answer)


def _keep(slabs: dict[str, MappedSlab], names: tuple[str, ...]) -> None:
    for name in [n for n in slabs if n not in names]:
        slabs.pop(name).close()


def _bigger_out_slab(conn: Connection, sock: socket.socket, slabs: dict[str, MappedSlab], old: str,
                     nbytes: int) -> str:  # fmt: skip
    """Ask the service for an output slab of at least `nbytes`; its name, or '' if told to stop."""
    from services.common.errors import ResourceExhausted
    from services.inference.shm import MappedSlab, receive_fds

    try:
        reply(conn, "grow", nbytes)
        answer = read_message(conn)
        if answer[0] == "refuse":
            raise ResourceExhausted(answer[1])
        if answer[0] != "out":
            return ""
        name = answer[1]
        slabs[name] = MappedSlab(name, receive_fds(sock, 1)[0])
    except (EOFError, OSError, ValueError):
        return ""
    slabs.pop(old).close()
    return str(name)


def main() -> None:
    # The service owns shutdown; Ctrl-C in a terminal must not kill workers under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    config = read_message(conn)
    try:
        policy = dict(config["sandbox"], readable=tuple(config["sandbox"].get("readable") or ()))
        report = sandbox.apply(sandbox.SandboxPolicy(**policy))
    except sandbox.SandboxRefused as exc:
        reply(conn, "error", "failed_precondition", str(exc))
        return
    if "filesystem" in report.applied:
        sys.dont_write_bytecode = True  # nothing is writable now; do not even try
        # torch names a temp and a compile-cache directory on import (tempfile probes by writing a
        # file; the cache directory is created). Eager models write neither: name ones that exist,
        # so the names resolve while any write still fails with EACCES.
        scratch = "/tmp" if os.path.isdir("/tmp") else "/"
        tempfile.tempdir = scratch
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch
    if config["format"] == "hf_causal_lm":
        # Nothing may be fetched from the Hugging Face hub: the checkpoint is the directory given.
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                          HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
        from services.inference import _generative_worker

        _generative_worker.serve(conn, config, report)
        # Every generation has ended and been answered: skip the interpreter's slow teardown of torch.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    worker_main(conn, config, report)


if __name__ == "__main__":
    main()
