"""How a pod spec becomes a local process (pure, apart from writing volume files): the argv,
the environment, and volumes as local directories with mount paths rewritten onto them.

A pod dict here is the API's camelCase JSON (`ApiClient.sanitize_for_serialization`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (kind, name, key) -> the value, or None when the object or key does not exist.
Lookup = Callable[[str, str, str | None], Any]


class PodSpecError(RuntimeError):
    """The pod cannot start (kubelet: CreateContainerConfigError): a missing key, no command."""


@dataclass(frozen=True)
class Mount:
    mount_path: str
    local_dir: Path


def server_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The one container we run (the first: our pods have exactly one)."""
    containers = pod["spec"].get("containers") or []
    if not containers:
        raise PodSpecError("pod has no containers")
    return containers[0]


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names replaced, `$$` escapes, the rest kept."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, value)


def resolve_argv(container: Mapping[str, Any], env: Mapping[str, str], path: str) -> list[str]:
    """`command` + `args` with `$(VAR)` expanded, the executable found on `path`."""
    argv = [expand(arg, env) for arg in (*(container.get("command") or []), *(container.get("args") or []))]
    if not argv:
        raise PodSpecError("container has no command: the image's entrypoint can't run locally")
    found = shutil.which(argv[0], path=path)
    if found is None:
        raise PodSpecError(f"executable {argv[0]!r} not found on PATH")
    return [found, *argv[1:]]


def volume_dirs(pod: Mapping[str, Any], pod_dir: Path) -> dict[str, Path]:
    return {
        volume["name"]: pod_dir / "volumes" / volume["name"] for volume in pod["spec"].get("volumes") or []
    }


def container_mounts(container: Mapping[str, Any], dirs: Mapping[str, Path]) -> list[Mount]:
    """Mounts longest path first, so a nested mount wins when rewriting paths."""
    mounts = [
        Mount(m["mountPath"].rstrip("/") or "/", dirs[m["name"]] / m.get("subPath", ""))
        for m in container.get("volumeMounts") or []
        if m["name"] in dirs
    ]
    return sorted(mounts, key=lambda m: len(m.mount_path), reverse=True)


def rewrite_path(value: str, mounts: list[Mount]) -> str:
    """A value naming a path under a mount, pointed at the mount's local directory."""
    for mount in mounts:
        if value == mount.mount_path or value.startswith(mount.mount_path + "/"):
            return str(mount.local_dir) + value[len(mount.mount_path) :]
    return value


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup, mounts: list[Mount]
) -> dict[str, str]:
    """The container's environment as kubelet builds it (envFrom, then env), paths rewritten."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, field in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if ref := source.get(field):
                data = lookup(kind, ref["name"], None)
                if data is None and not ref.get("optional"):
                    raise PodSpecError(f"{kind} {ref['name']!r} not found")
                env.update({prefix + key: value for key, value in (data or {}).items()})
    for item in container.get("env") or []:
        value = _env_value(pod, item, lookup)
        if value is not None:
            env[item["name"]] = rewrite_path(expand(value, env), mounts)
    return env


_FIELDS = {
    "metadata.name": lambda pod: pod["metadata"]["name"],
    "metadata.namespace": lambda pod: pod["metadata"]["namespace"],
    "metadata.uid": lambda pod: pod["metadata"].get("uid", ""),
    "spec.nodeName": lambda pod: pod["spec"].get("nodeName", ""),
    "spec.serviceAccountName": lambda pod: pod["spec"].get("serviceAccountName", "default"),
    "status.podIP": lambda pod: (pod.get("status") or {}).get("podIP", ""),
    "status.hostIP": lambda pod: (pod.get("status") or {}).get("hostIP", ""),
}


def _env_value(pod: Mapping[str, Any], item: Mapping[str, Any], lookup: Lookup) -> str | None:
    if "value" in item or "valueFrom" not in item:
        return str(item.get("value", ""))
    source = item["valueFrom"]
    if field := source.get("fieldRef"):
        path = field["fieldPath"]
        if path not in _FIELDS:
            raise PodSpecError(f"fieldRef {path!r} is not supported by the local pod runner")
        return _FIELDS[path](pod)
    for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
        if ref := source.get(key):
            value = lookup(kind, ref["name"], ref["key"])
            if value is None and not ref.get("optional"):
                raise PodSpecError(f"{kind} {ref['name']!r} has no key {ref['key']!r}")
            return value
    raise PodSpecError(f"env {item['name']!r}: unsupported valueFrom {sorted(source)}")


def volume_files(volume: Mapping[str, Any], lookup: Lookup) -> dict[str, bytes] | None:
    """File name -> content of a ConfigMap/Secret volume; None for a directory-only volume."""
    for kind, field, name_key in (("configmap", "configMap", "name"), ("secret", "secret", "secretName")):
        if (ref := volume.get(field)) is not None:
            data = lookup(kind, ref[name_key], None)
            if data is None and not ref.get("optional"):
                raise PodSpecError(f"{kind} {ref[name_key]!r} for volume {volume['name']!r} not found")
            data = data or {}
            items = ref.get("items") or [{"key": key, "path": key} for key in data]
            return {item["path"]: _bytes(data.get(item["key"], "")) for item in items}
    return None


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def write_volume(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Make `directory` hold exactly `files`; each write atomic (readers never see half a file,
    as with kubelet's symlink swap). True when anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = False
    for name, content in files.items():
        target = directory / name
        if target.is_file() and target.read_bytes() == content:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        partial.write_bytes(content)
        os.replace(partial, target)
        changed = True
    for stale in [p for p in directory.iterdir() if p.is_file() and p.name not in files]:
        if not stale.name.startswith("."):
            stale.unlink()
            changed = True
    return changed
