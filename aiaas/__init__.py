"""aiaas: turn trained PyTorch models into a production gRPC service.

The client package: generated stubs (`aiaas.<service>.v1`), the Python SDK and the `aiaas` CLI.
Heavy modules (torch) load only when the name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RegistryClient": "aiaas.registry_client",
    "GatewayClient": "aiaas.gateway_client",
    "MonitorClient": "aiaas.monitor_client",
    "deploy": "aiaas.deployment",
    "deploy_lm": "aiaas.lm",
}

__all__ = ["GatewayClient", "MonitorClient", "RegistryClient", "__version__", "deploy", "deploy_lm"]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'aiaas' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        # The client distribution (aiaas-client) ships the SDK clients, not the pipeline.
        raise ImportError(f"aiaas.{name} needs the full aiaas distribution (servers, CLI, pipeline; "
                          "pip install aiaas); this environment has only the client package") from None
    value = getattr(module, name)
    globals()[name] = value
    return value
