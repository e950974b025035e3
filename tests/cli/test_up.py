"""`aiaas up` as a real process: four services, the demo through the gateway with tritonclient,
the demo's held-out set and spec evaluated out of the box, the generative demo registered as
`hf_causal_lm`, a module deployed with `aiaas.deploy` and rolled out (int8 canary, production,
rollback) through the gateway, SIGINT, a clean exit with no process left behind; a second `up`
reuses the state (no training); a service that cannot start is reported with its log and the
others are stopped.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import aiaas
from aiaas import RegistryClient
from aiaas.cli.main import main as cli
from aiaas.eval import registry_io
from aiaas.lm import load_causal_lm
from aiaas.up import (
    StartupFailed,
    check_ports_free,
    gateway_auth,
    home_lock,
    run_up,
    service_plan,
    stack_identity,
    stack_ports,
)
from services.common.authz import TokenVerifier
from services.common.settings import load_settings
from tests.pipeline.models import mlp
from tests.support.procs import REPO_ROOT

STARTUP_S = 180.0
# demo-lm trained for a few steps only: what is checked here is that it is built and registered
# (tests/cli/test_demos.py checks the builder itself).
DEMO_LM_STEPS = "20"


def _free_base_port() -> int:
    """Five consecutive free ports (gateway, registry, inference, monitor, metrics)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 5 > 65535:
            continue
        try:
            check_ports_free("127.0.0.1", stack_ports(base))
            return base
        except StartupFailed:
            continue
    raise RuntimeError("no run of five free ports")


# Flags `up` passes must exist in each service's settings and validate ------------------------

def test_service_flags_match_each_services_settings(tmp_path: Path) -> None:
    from services.gateway.settings import GatewaySettings
    from services.inference.settings import InferenceSettings
    from services.monitor.settings import MonitorSettings
    from services.registry.settings import RegistrySettings

    classes: dict[str, type[Any]] = {"registry": RegistrySettings, "inference": InferenceSettings,
                                     "monitor": MonitorSettings, "gateway": GatewaySettings}
    ports = stack_ports(20000)
    plan = service_plan(tmp_path, "127.0.0.1", ports)
    assert [s.name for s in plan] == ["registry", "inference", "monitor", "gateway"]
    for spec in plan:
        settings = load_settings(classes[spec.name], spec.args, service=spec.name, environ={})
        assert settings.port == ports[spec.name] and settings.host == "127.0.0.1"
    gateway = load_settings(GatewaySettings, plan[-1].args, service="gateway", environ={})
    assert gateway.auth_enabled is False and gateway.inference_targets == ("127.0.0.1:20002",)
    inference = load_settings(InferenceSettings, plan[1].args, service="inference", environ={})
    assert inference.follow_aliases == ("production", "canary")
    registry = load_settings(RegistrySettings, plan[0].args, service="registry", environ={})
    assert registry.resolved_database_url() == f"sqlite:///{tmp_path / 'registry.db'}"


def test_default_ports_and_base_port() -> None:
    assert stack_ports(None) == {"gateway": 8001, "registry": 50051, "inference": 50052, "monitor": 50053,
                                 "metrics": 9464, "openai": 8000}
    assert stack_ports(9000) == {"gateway": 9000, "registry": 9001, "inference": 9002, "monitor": 9003,
                                 "metrics": 9004, "openai": 9005}


def test_auth_stays_on_off_loopback_with_a_kept_secret(tmp_path: Path) -> None:
    from services.gateway.settings import GatewaySettings

    auth = gateway_auth(tmp_path)
    assert (auth.path.stat().st_mode & 0o777) == 0o600 and gateway_auth(tmp_path) == auth
    gateway = service_plan(tmp_path, "0.0.0.0", stack_ports(None), auth)[-1]
    assert "--no-auth-enabled" not in gateway.args
    assert auth.pepper not in " ".join(gateway.args)
    settings = load_settings(GatewaySettings, gateway.args, service="gateway", environ=dict(gateway.env))
    assert settings.auth_enabled and settings.key_pepper == auth.pepper
    assert settings.bootstrap_admin_key == auth.admin_key and settings.inference_targets == ("127.0.0.1:50052",)


def test_only_the_gateway_leaves_loopback_and_every_service_has_its_own_identity(tmp_path: Path) -> None:
    from services.gateway.settings import GatewaySettings
    from services.inference.settings import InferenceSettings
    from services.monitor.settings import MonitorSettings
    from services.registry.settings import RegistrySettings

    classes: dict[str, type[Any]] = {"registry": RegistrySettings, "inference": InferenceSettings,
                                     "monitor": MonitorSettings, "gateway": GatewaySettings}
    identity = stack_identity(tmp_path)
    plan = service_plan(tmp_path, "0.0.0.0", stack_ports(None), gateway_auth(tmp_path), identity)
    for spec in plan:
        settings = load_settings(classes[spec.name], spec.args, service=spec.name, environ=dict(spec.env))
        assert settings.host == ("0.0.0.0" if spec.name == "gateway" else "127.0.0.1"), spec.name
        assert settings.require_identity and settings.identity_token_key == str(identity.public_key)
        # Each presents its own token, signed by the stack's key, readable by its owner only.
        token_file = Path(settings.identity_token_file or "")
        assert token_file == identity.token_file(spec.name) and (token_file.stat().st_mode & 0o777) == 0o600
        assert TokenVerifier.from_file(str(identity.public_key)).verify(token_file.read_text()) == spec.name
    assert (identity.directory / "signing.key").stat().st_mode & 0o777 == 0o600
    # A second start keeps the key (tokens minted before still verify).
    again = stack_identity(tmp_path)
    assert again.public_key.read_bytes() == identity.public_key.read_bytes()


def test_a_gateway_exposed_without_keys_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_up(home=str(tmp_path), host="0.0.0.0", gateway_auth_on=False) == 2
    assert "--insecure" in capsys.readouterr().err
    assert not (tmp_path / "identity").exists()  # refused before anything was made or started


def test_demo_lm_steps_out_of_range_are_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_up(home=str(tmp_path), demo_lm_steps=0) == 2
    assert "--demo-lm-steps must be 1..100000, not 0" in capsys.readouterr().err
    assert not (tmp_path / "identity").exists()


def test_busy_port_and_second_up_on_one_home_are_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StartupFailed, match=f"port {port} .* in use"):
            check_ports_free("127.0.0.1", {"gateway": port})
    with home_lock(tmp_path), pytest.raises(StartupFailed, match="another `aiaas up`"), home_lock(tmp_path):
        pass


# The real thing ------------------------------------------------------------------------------

class UpProcess:
    """`aiaas up` as a child process; its stdout read line by line on a thread."""

    def __init__(self, home: Path, base_port: int, env: dict[str, str] | None = None) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiaas.cli.main", "up", "--home", str(home), "--base-port", str(base_port),
             "--demo-lm-steps", DEMO_LM_STEPS],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = STARTUP_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed; output so far:\n" + "\n".join(self.seen))

    def wait_seen(self, text: str, timeout: float = STARTUP_S) -> str:
        """As wait_for, but a line already read counts too (for lines printed in the background)."""
        for line in self.seen:
            if text in line:
                return line
        return self.wait_for(text, timeout)

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "\n".join(self.seen)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill(self) -> None:
        for child in self.descendants() if self.proc.poll() is None else []:
            child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _stop_with_sigint(up: UpProcess) -> None:
    children = up.descendants()
    assert len(children) >= 4, [c.cmdline() for c in children]
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0, up.output()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert "aiaas up: stopped" in up.output()


@dataclasses.dataclass
class Stack:
    up: UpProcess
    home: Path
    base: int

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.base}"

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.base + 1}"

    @property
    def inference(self) -> str:
        return f"127.0.0.1:{self.base + 2}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("up") / "aiaas-home"
    base = _free_base_port()
    up = UpProcess(home, base)
    token_before = os.environ.get("AIAAS_IDENTITY_TOKEN_FILE")
    try:
        up.wait_for("Ctrl-C stops everything")
        # As the operator on this machine: the stack's own admin token (aiaas up made it).
        os.environ["AIAAS_IDENTITY_TOKEN_FILE"] = str(home / "identity" / "admin.token")
        yield Stack(up, home, base)
    finally:
        up.kill()
        if token_before is not None:
            os.environ["AIAAS_IDENTITY_TOKEN_FILE"] = token_before


def _infer(gateway: str, model: str, x: np.ndarray, version: str = "", timeout: float = 30.0) -> np.ndarray:
    client = grpcclient.InferenceServerClient(gateway)
    try:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], model_version=version, client_timeout=timeout).as_numpy("OUTPUT0")
    finally:
        client.close()


def _infer_when_ready(gateway: str, model: str, x: np.ndarray, version: str = "",
                      expect: np.ndarray | None = None) -> np.ndarray:
    """Inference replicas pick a new alias target up from the registry's feed: poll with a deadline."""
    deadline = time.monotonic() + 60
    while True:
        try:
            out = _infer(gateway, model, x, version, timeout=10)
            if expect is None or np.allclose(out, expect, atol=1e-4):
                return out
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return out
        time.sleep(0.2)


X = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)


def test_demo_answers_through_the_gateway_with_tritonclient(stack: Stack) -> None:
    output = stack.up.output()
    assert "registered version 1 (torch_export), production -> 1" in output
    assert "AUTHENTICATION IS OFF" in output
    assert f'InferenceServerClient("{stack.gateway}")' in output
    assert "aiaas predict demo --input INPUT0=" in output
    scores = _infer(stack.gateway, "demo", X)
    assert scores.shape == (3, 10) and scores.dtype == np.float32


def test_the_demo_evaluates_out_of_the_box_on_its_held_out_set(stack: Stack) -> None:
    spec = stack.home / "demo" / "eval-spec.yaml"
    output = stack.up.output()
    assert f"demo-test: registered (2000 held-out rows) from {stack.home / 'demo' / 'demo-test.npz'}" in output
    # The command `up` prints is the one run here.
    command = (f"aiaas evaluate demo 1 --dataset demo-test --spec {spec} --registry {stack.registry} "
               f"--inference {stack.inference}")
    assert command in output
    assert cli([*command.split()[1:], "--quiet"]) == 0
    with RegistryClient(stack.registry) as client:
        result = registry_io.get_evaluation(client, "demo", 1, "holdout")
    assert result.passed and result.dataset == "demo-test" and result.path == "serving"
    slices = {s.slice: s for s in result.slices}
    assert set(slices) == {"overall", "difficulty=easy", "difficulty=medium", "difficulty=hard"}
    assert slices["overall"].example_count == 2000
    assert slices["overall"].metrics["accuracy"] > 0.9  # ten classes: chance is 0.1
    assert slices["difficulty=hard"].metrics["accuracy"] < slices["difficulty=easy"].metrics["accuracy"]


def test_the_generative_demo_is_registered_as_a_checkpoint_that_loads_and_generates(stack: Stack,
                                                                                     tmp_path: Path) -> None:
    line = stack.up.wait_seen("demo-lm: trained")
    assert f"({DEMO_LM_STEPS} steps" in line and "registered version 1 (hf_causal_lm), production -> 1" in line
    with RegistryClient(stack.registry) as client:
        version = client.get_version("demo-lm", "production")
        assert version.version == 1 and {f.path for f in version.files} >= {"config.json", "model.safetensors",
                                                                              "tokenizer.json"}
        client.download_files("demo-lm", "production", tmp_path / "demo-lm")
    lm = load_causal_lm(tmp_path / "demo-lm")
    prompt = lm.tokenizer("The gateway", return_tensors="pt")
    out = lm.model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
    # The checkpoint cached under the home is what was registered.
    cached = [p for p in (stack.home / "demo").iterdir() if p.is_dir() and p.name.startswith("lm-")]
    assert len(cached) == 1
    assert (cached[0] / "model.safetensors").read_bytes() == (tmp_path / "demo-lm" / "model.safetensors").read_bytes()


def test_deploy_a_module_and_roll_it_out_through_the_gateway(stack: Stack) -> None:
    module = mlp(seed=3)
    deployment = aiaas.deploy(module, torch.randn(4, 10), name="served-mlp", registry=stack.registry)
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(_infer_when_ready(stack.gateway, "served-mlp", X), expected, atol=1e-5)

    # int8 as a canary taking 50% of the traffic, then production; each step one command.
    registry = ["--registry", stack.registry]
    assert cli(["optimize", "served-mlp", str(deployment.version), "--quantize", "int8-dynamic", *registry]) == 0
    assert cli(["promote", "served-mlp", "2", "--alias", "canary", "--weight", "50", *registry,
                "--gateway", stack.gateway]) == 0
    canary = _infer_when_ready(stack.gateway, "served-mlp", X, version="2")
    np.testing.assert_allclose(canary, expected, atol=0.5)
    assert cli(["promote", "served-mlp", "2", "--alias", "production", *registry, "--gateway", stack.gateway]) == 0
    with RegistryClient(stack.registry) as client:
        assert client.get_version("served-mlp", "production").version == 2
        client.rollback_alias("served-mlp", "production", reason="test")
        assert client.get_version("served-mlp", "production").version == 1
    np.testing.assert_allclose(_infer_when_ready(stack.gateway, "served-mlp", X, expect=expected), expected,
                               atol=1e-5)


def test_sigint_stops_everything_and_a_second_up_reuses_state(stack: Stack) -> None:
    scores = _infer(stack.gateway, "demo", X)
    _stop_with_sigint(stack.up)
    assert (stack.home / "registry.db").exists() and (stack.home / "logs" / "gateway.log").exists()

    again = UpProcess(stack.home, stack.base)
    try:
        assert "reusing version 1" in again.wait_for("demo: ")
        assert "demo-test: already registered" in again.wait_for("demo-test: ")
        again.wait_for("Ctrl-C stops everything")
        assert "demo-lm: reusing version 1 (production)" in again.wait_seen("demo-lm: reusing")
        np.testing.assert_allclose(_infer(stack.gateway, "demo", X), scores, rtol=1e-5, atol=1e-5)
        _stop_with_sigint(again)
    finally:
        again.kill()


@pytest.fixture
def up_home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "aiaas-home"


def test_a_service_that_cannot_start_is_reported_and_the_rest_stopped(up_home: Path) -> None:
    base = _free_base_port()
    # Valid for every service but the inference service, which refuses it at start-up.
    up = UpProcess(up_home, base, env={"AIAAS_INFERENCE_MAX_QUEUE_SIZE": "0"})
    try:
        assert up.proc.wait(STARTUP_S) == 1
        output = up.output()
        assert "inference exited with code" in output and "max_queue_size must be >= 1" in output
        assert "stopping registry" in output
        check_ports_free("127.0.0.1", stack_ports(base))
    finally:
        up.kill()
