"""The kustomize subset the renderer implements, on small kustomizations. Expected outputs
are what `kubectl kustomize` (kustomize v5.5) produces for the same input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aiaas.k8s.kustomize import KustomizeError, build, split_image
from aiaas.k8s.patch import PatchError, json6902, strategic_merge

POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
    "spec": {"containers": [
        {"name": "c", "image": "x", "env": [{"name": "A", "value": "a"}, {"name": "B", "value": "b"},
                                            {"name": "D", "value": "d"}]},
        {"name": "y", "image": "y"},
    ]},
}


def test_strategic_merge_puts_patch_elements_first_like_kustomize() -> None:
    patch = {"spec": {"containers": [
        {"name": "c", "env": [{"name": "B", "value": "b2"}, {"name": "C", "value": "c"}]},
        {"name": "z", "image": "z"},
    ]}}
    merged = strategic_merge(POD, patch)
    containers = merged["spec"]["containers"]
    assert [c["name"] for c in containers] == ["c", "z", "y"]
    assert containers[0]["env"] == [{"name": "B", "value": "b2"}, {"name": "C", "value": "c"},
                                    {"name": "A", "value": "a"}, {"name": "D", "value": "d"}]
    assert containers[0]["image"] == "x"
    assert POD["spec"]["containers"][0]["env"][1]["value"] == "b"


def test_strategic_merge_replaces_plain_lists_and_deletes_nulls() -> None:
    base = {"args": ["a", "b"], "tolerations": [{"key": "k"}], "keep": 1, "drop": 2}
    merged = strategic_merge(base, {"args": ["c"], "tolerations": [{"key": "j"}], "drop": None})
    assert merged == {"args": ["c"], "tolerations": [{"key": "j"}], "keep": 1}
    with pytest.raises(PatchError):
        strategic_merge(base, {"$patch": "replace"})


def test_json6902_add_remove_replace_test() -> None:
    doc = {"a": {"b": [1, 2]}, "c/d": 1}
    ops = [{"op": "add", "path": "/a/b/-", "value": 3}, {"op": "add", "path": "/a/b/0", "value": 0},
           {"op": "replace", "path": "/a/b/1", "value": 9}, {"op": "remove", "path": "/c~1d"},
           {"op": "test", "path": "/a/b", "value": [0, 9, 2, 3]}]
    assert json6902(doc, ops) == {"a": {"b": [0, 9, 2, 3]}}
    for bad in ({"op": "remove", "path": "/x"}, {"op": "move", "path": "/a"}, {"op": "replace", "path": "/a/b/7"},
                {"op": "test", "path": "/c~1d", "value": 2}):
        with pytest.raises(PatchError):
            json6902(doc, [{"value": None, **bad}])


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
    [web] = build(tmp_path / "over")
    assert web["metadata"] == {"name": "web", "namespace": "shop", "labels": {"team": "a"}}
    assert web["spec"]["replicas"] == 3 and web["spec"]["paused"] is True
    assert web["spec"]["template"]["metadata"]["labels"] == {"app": "web", "team": "a"}
    assert web["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/web:2"


@pytest.mark.parametrize(("kustomization", "message"), [
    ({"resources": ["web.yaml"], "commonLabels": {"a": "b"}}, "unsupported kustomization fields"),
    ({"resources": ["web.yaml", "web.yaml"]}, "defined twice"),
    ({"resources": ["missing.yaml"]}, "does not exist"),
    ({"resources": ["web.yaml"], "patches": [{"patch": "apiVersion: v1\nkind: Service\nmetadata: {name: web}"}]},
     "matches no"),
    # kustomize, too, matches a patch without a target by its apiVersion.
    ({"resources": ["web.yaml"], "patches": [{"patch": "kind: Deployment\nmetadata: {name: web}"}]}, "matches no"),
    ({"resources": ["web.yaml"], "patches": [{"patch": "- {op: remove, path: /spec}"}]}, "needs a target"),
])
def test_unsupported_or_broken_kustomizations_are_refused(tmp_path: Path, kustomization: dict, message: str) -> None:
    write(tmp_path, {"web.yaml": [DEPLOYMENT], "kustomization.yaml": kustomization})
    with pytest.raises(KustomizeError, match=message):
        build(tmp_path)


def test_split_image() -> None:
    assert split_image("aiaas") == ("aiaas", "", "")
    assert split_image("localhost:5000/aiaas:0.1.0") == ("localhost:5000/aiaas", "0.1.0", "")
    assert split_image("ghcr.io/a/b@sha256:ab") == ("ghcr.io/a/b", "", "sha256:ab")
