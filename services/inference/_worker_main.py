"""The body of a model worker process: `python -m services.inference._worker_main FD`.

The service starts it as a fresh interpreter (never a fork of the service, and without
multiprocessing's re-import of the service's main module), hands it a socket as FD, and sends
the `WorkerConfig` as the first message.

It loads the model once, then serves one batch at a time: inputs are read in place from the
input slab, outputs are written to the output slab (a larger one is created when they do not
fit), and only small control tuples cross the pipe.

Messages in:  ("run", in_slab, out_slab, input_metas) | ("stop",)
Messages out: ("ready", pid) | ("error", code, message)      after loading
              ("ok", output_metas, in_ns, infer_ns, out_ns, new_out_slab | None)
              ("fail", code, message)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from services.common.errors import AiaasError
from services.inference.loaders import LoadedModel, TensorSig, load_model
from services.inference.shm import Packed, Slab, views


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    artifact_path: str
    format: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    device: str
    threads: int


def _service_owns_shared_memory() -> None:
    """The service creates, adopts and unlinks every segment; a tracker here would unlink its slabs."""
    from multiprocessing import resource_tracker

    def untracked(name: str, rtype: str) -> None:
        return None

    resource_tracker.register = untracked  # type: ignore[assignment]
    resource_tracker.unregister = untracked  # type: ignore[assignment]


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    # The service owns shutdown; Ctrl-C in a terminal must not kill workers under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _service_owns_shared_memory()
    try:
        if config.format != "onnx":  # an ONNX worker never needs torch's memory or start-up time
            import torch

            torch.set_num_threads(config.threads)
            with contextlib.suppress(RuntimeError):  # only settable before any parallel work
                torch.set_num_interop_threads(1)
        model = load_model(
            config.artifact_path,
            config.format,
            config.inputs,
            config.outputs,
            device=config.device,
            threads=config.threads,
        )
    except AiaasError as exc:
        conn.send(("error", exc.code.value, exc.message))
        return
    except Exception as exc:  # noqa: BLE001 - the loader's own message is what the operator needs
        conn.send(("error", "failed_precondition", f"cannot load model: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    _serve(conn, model)


def _serve(conn: Connection, model: LoadedModel) -> None:
    in_slab: Slab | None = None
    out_slab: Slab | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the service went away
        if message[0] != "run":
            return
        _, in_name, out_name, metas = message
        if in_slab is None or in_slab.name != in_name:
            if in_slab is not None:
                in_slab.close()
            in_slab = Slab.attach(in_name)
        if out_slab is None or out_slab.name != out_name:
            if out_slab is not None:
                out_slab.close()
            out_slab = Slab.attach(out_name)
        try:
            outputs, in_ns, infer_ns, out_ns = model.run(views(in_slab.buf, metas))
            started = time.perf_counter_ns()
            packed = Packed(outputs)
            del outputs
            new_name = None
            if packed.nbytes > out_slab.size:
                # The service adopts (and later unlinks) the bigger slab we create here.
                out_slab.close()
                out_slab = Slab.create(max(packed.nbytes, 2 * out_slab.size))
                out_slab.owner = False  # the service adopts it
                new_name = out_slab.name
            out_metas = packed.write(out_slab.buf)
            del packed
            reply: tuple[Any, ...] = (
                "ok",
                out_metas,
                in_ns,
                infer_ns,
                out_ns + time.perf_counter_ns() - started,
                new_name,
            )
        except AiaasError as exc:
            reply = ("fail", exc.code.value, exc.message)
        except Exception as exc:  # noqa: BLE001 - reported to the service as the batch's error
            reply = ("fail", "internal", f"model execution failed: {type(exc).__name__}: {exc}")
        conn.send(reply)


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    fields = conn.recv()
    worker_main(conn, WorkerConfig(*fields))


if __name__ == "__main__":
    main()
