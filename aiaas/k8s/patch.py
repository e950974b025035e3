"""The two patch kinds kustomize applies: strategic merge (for the fields we use) and JSON 6902.

The strategic merge follows kustomize's (kyaml) results: lists of objects with a Kubernetes
merge key are merged element by element, the patch's elements first (merged with the base
element of the same key), then the base's remaining elements; every other list is replaced;
a `null` value deletes the field.
"""

from __future__ import annotations

import copy
from typing import Any

Manifest = dict[str, Any]

# patchMergeKey of the Kubernetes API fields that are lists of objects.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "resourceClaims": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "topologySpreadConstraints": "topologyKey",
    "hostAliases": "ip",
}


class PatchError(ValueError):
    """A patch that cannot be applied to its target."""


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":
        # Container ports merge on containerPort, Service ports on port.
        return "containerPort" if any("containerPort" in item for item in items) else "port"
    return _MERGE_KEYS.get(field)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Return `base` with a strategic-merge `patch` applied; neither argument is changed."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise PatchError(f"$patch directives are not supported (field {field!r})")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = _without_nulls(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        return _merge_list(base, patch, field)
    return _without_nulls(patch)


def _merge_list(base: list[Any], patch: list[Any], field: str) -> list[Any]:
    objects = all(isinstance(item, dict) for item in base + patch)
    key = _merge_key(field, base + patch) if objects else None
    if key is None or not all(key in item for item in base + patch):
        return _without_nulls(patch)
    by_key = {item[key]: item for item in base}
    merged = [strategic_merge(by_key[item[key]], item, field) if item[key] in by_key else item
              for item in patch]
    patched = {item[key] for item in patch}
    return merged + [copy.deepcopy(item) for item in base if item[key] not in patched]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return copy.deepcopy(value)


def json6902(document: Manifest, operations: list[Manifest]) -> Manifest:
    """Apply JSON patch operations (add, remove, replace, test) to a copy of `document`."""
    result = copy.deepcopy(document)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise PatchError(f"JSON patch path must start with '/': {path!r}")
        *parents, last = [_unescape(part) for part in path[1:].split("/")]
        container: Any = result
        for part in parents:
            container = _step(container, part, path)
        if op == "add":
            _add(container, last, copy.deepcopy(operation["value"]), path)
        elif op == "remove":
            _step(container, last, path)
            del container[_index(container, last, path) if isinstance(container, list) else last]
        elif op == "replace":
            _step(container, last, path)
            slot = _index(container, last, path) if isinstance(container, list) else last
            container[slot] = copy.deepcopy(operation["value"])
        elif op == "test":
            if _step(container, last, path) != operation["value"]:
                raise PatchError(f"JSON patch test failed at {path}")
        else:
            raise PatchError(f"unsupported JSON patch op {op!r}")
    return result


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def _index(container: list[Any], part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(container):
        raise PatchError(f"no list element {part!r} at {path}")
    return int(part)


def _step(container: Any, part: str, path: str) -> Any:
    if isinstance(container, list):
        return container[_index(container, part, path)]
    if isinstance(container, dict) and part in container:
        return container[part]
    raise PatchError(f"path {path} does not exist")


def _add(container: Any, part: str, value: Any, path: str) -> None:
    if isinstance(container, dict):
        container[part] = value
    elif isinstance(container, list) and part == "-":
        container.append(value)
    elif isinstance(container, list) and part.isdigit() and int(part) <= len(container):
        container.insert(int(part), value)
    else:
        raise PatchError(f"cannot add at {path}")
