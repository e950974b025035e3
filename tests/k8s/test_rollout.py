"""The pure parts of `aiaas k8s apply` and `status`: plan order, generated Secrets, the
rollout-done predicate on sample status objects, pod rows, and the CLI's render."""

from __future__ import annotations

import json

import pytest
import yaml

from aiaas.cli.main import main
from aiaas.k8s.manifest import Manifest
from aiaas.k8s.render import render
from aiaas.k8s.rollout import apply_plan, generated_secret, pod_row, rollout_state


def kinds_in_order(overlay: str) -> list[str]:
    return [o["kind"] for o in apply_plan(render(overlay))]


@pytest.mark.parametrize("overlay", ["dev", "prod", "gpu"])
def test_plan_applies_dependencies_first(overlay: str) -> None:
    kinds = kinds_in_order(overlay)
    assert kinds[0] == "Namespace"
    first = {kind: kinds.index(kind) for kind in reversed(kinds)}
    last = {kind: i for i, kind in enumerate(kinds)}
    for before, after in (("ServiceAccount", "Deployment"), ("ConfigMap", "Deployment"),
                          ("ConfigMap", "StatefulSet"), ("Service", "StatefulSet"), ("Deployment", "NetworkPolicy")):
        assert last[before] < first[after], (before, after)
    if overlay != "dev":
        assert last["Deployment"] < first["HorizontalPodAutoscaler"]
        assert last["Deployment"] < first["PodDisruptionBudget"]
    else:
        # dev ships no secret values: the pepper is generated, the certificates come from dev-certs.
        assert "Secret" not in kinds


def test_generated_secrets_are_random_and_url_safe() -> None:
    one = generated_secret("aiaas", "aiaas-postgres", {"password"})
    two = generated_secret("aiaas", "aiaas-postgres", {"password"})
    assert one["metadata"] == {**one["metadata"], "name": "aiaas-postgres", "namespace": "aiaas"}
    value = one["stringData"]["password"]
    assert value != two["stringData"]["password"] and len(value) >= 32
    assert all(ch.isalnum() or ch in "-_" for ch in value)


def deployment(generation: int = 2, **status: object) -> dict:
    return {"kind": "Deployment", "metadata": {"name": "gateway", "generation": generation},
            "spec": {"replicas": 3}, "status": {"observedGeneration": 2, **status}}


@pytest.mark.parametrize(("obj", "done", "message"), [
    (deployment(generation=3), False, "waiting for the spec update to be observed"),
    (deployment(updatedReplicas=1, replicas=3, availableReplicas=3), False, "1 of 3 new replicas updated"),
    (deployment(updatedReplicas=3, replicas=4, availableReplicas=3), False, "1 old replicas pending termination"),
    (deployment(updatedReplicas=3, replicas=3, availableReplicas=2), False, "2 of 3 updated replicas available"),
    (deployment(updatedReplicas=3, replicas=3, availableReplicas=3), True, "3 of 3 replicas available"),
])
def test_deployment_rollout_state(obj: dict, done: bool, message: str) -> None:
    state = rollout_state(obj)
    assert (state.done, state.message, state.failed) == (done, message, False)


def test_deployment_past_its_deadline_has_failed() -> None:
    obj = deployment(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}])
    assert rollout_state(obj).failed


def test_deployment_without_replicas_defaults_to_one() -> None:
    obj = deployment(updatedReplicas=1, replicas=1, availableReplicas=1)
    del obj["spec"]["replicas"]
    assert rollout_state(obj).message == "1 of 1 replicas available"
    assert rollout_state(obj).done


def statefulset(**status: object) -> dict:
    return {"kind": "StatefulSet", "metadata": {"name": "registry", "generation": 1},
            "spec": {"replicas": 1, "updateStrategy": {"type": "RollingUpdate"}},
            "status": {"observedGeneration": 1, **status}}


def test_statefulset_rollout_state() -> None:
    assert rollout_state(statefulset(readyReplicas=0)).message == "0 of 1 pods ready"
    moving = statefulset(readyReplicas=1, updatedReplicas=1, currentRevision="r1", updateRevision="r2")
    assert not rollout_state(moving).done
    assert not rollout_state(statefulset(readyReplicas=1, updatedReplicas=0)).done
    assert rollout_state(statefulset(readyReplicas=1, updatedReplicas=1, currentRevision="r2",
                                     updateRevision="r2")).done
    assert rollout_state({"kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {},
                          "status": None}).message == "waiting for the spec update to be observed"


def test_pod_row_reports_readiness() -> None:
    pod: Manifest = {"metadata": {"name": "gateway-abc", "labels": {"app.kubernetes.io/name": "gateway"}},
                     "spec": {"containers": [{"name": "gateway"}], "nodeName": "node-1"},
                     "status": {"phase": "Running", "containerStatuses": [{"ready": True, "restartCount": 2}]}}
    row = pod_row(pod)
    assert (row.service, row.ready, row.restarts, row.node, row.is_ready) == ("gateway", "1/1", 2, "node-1", True)
    pod["status"]["containerStatuses"][0]["ready"] = False
    assert not pod_row(pod).is_ready
    pending = pod_row({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x"}]}, "status": {}})
    assert (pending.phase, pending.ready, pending.node, pending.is_ready) == ("Unknown", "0/1", "-", False)


def test_cli_render_prints_the_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "render", "prod"]) == 0
    objects = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    assert objects == render("prod")
    assert main(["k8s", "render", "dev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == render("dev")


def test_cli_render_check_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", "render", "gpu", "--check"]) == 0
    assert "0 problems" in capsys.readouterr().err
    assert main(["k8s", "render", "staging"]) == 1
    assert "unknown overlay 'staging'" in capsys.readouterr().err
