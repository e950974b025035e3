"""A workload's pod spec for tests that only look at workloads (where one always exists)."""

from __future__ import annotations

from typing import Any

from aiaas.k8s.manifest import Manifest, pod_spec


def spec_of(workload: Manifest) -> dict[str, Any]:
    """`pod_spec(workload)`, which is None only for objects that are not workloads."""
    spec = pod_spec(workload)
    assert spec is not None, f"{workload['kind']} {workload['metadata']['name']} has no pod spec"
    return spec
