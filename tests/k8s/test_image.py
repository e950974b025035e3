"""The Dockerfile agrees with the manifests: user, ports, entry points, CPU torch."""

from __future__ import annotations

import re
from pathlib import Path

from aiaas.k8s.checks import workloads
from aiaas.k8s.render import METRICS_PORT, SERVICE_PORTS, render
from tests.k8s.specs import spec_of

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_image_runs_as_the_uid_the_pods_run_as() -> None:
    assert instruction("USER")[-1] == "10001:10001"
    for workload in workloads(render("prod")):
        if workload["metadata"]["name"] in SERVICE_PORTS:
            context = spec_of(workload)["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (10001, 10001, 10001)


def test_image_exposes_every_service_port() -> None:
    exposed = {int(port) for port in instruction("EXPOSE")[-1].split()}
    assert exposed == set(SERVICE_PORTS.values()) | {METRICS_PORT}


def test_image_is_multi_stage_with_cpu_torch_by_default() -> None:
    assert len(instruction("FROM")) == 2
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert re.search(r"pip install 'torch>=2\.3,<2\.14' --index-url", DOCKERFILE)
    for service in SERVICE_PORTS:
        assert (ROOT / "services" / service / "__init__.py").is_file()


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"
    assert {"!pyproject.toml", "!setup.py", "!README.md", "!clients/python/", "!aiaas/", "!services/"} <= set(lines)


def test_image_installs_the_client_distribution_the_server_requires() -> None:
    assert "clients/python ./clients/python" in instruction("COPY")
    assert any(line.startswith("pip install ./clients/python '.[onnx]'") for line in instruction("RUN"))
