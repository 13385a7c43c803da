"""How the local pod runner turns a pod spec into a process: argv, env, volumes (pure parts)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from loraplex.localcluster import pod_spec
from loraplex.localcluster.pod_spec import Mount, PodSpecError

CONFIG = {"cfg": {"adapters.json": '[{"name": "sql"}]', "level": "debug"}}
SECRETS = {"tok": {"key": "s3cret"}}


def lookup(kind: str, name: str, key: str | None) -> Any:
    data = (SECRETS if kind == "secret" else CONFIG).get(name)
    return data if key is None or data is None else data.get(key)


def pod(env: list[dict[str, Any]], **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p-1", "namespace": "ns"},
        "spec": {"containers": [{"name": "server", "env": env, **container}]},
        "status": {"podIP": "127.9.0.2"},
    }


def test_env_resolves_literals_refs_and_fields_and_rewrites_mounted_paths(tmp_path: Path) -> None:
    env = [
        {"name": "ADAPTERS_FILE", "value": "/etc/adapters/adapters.json"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "OTHER", "value": "/etc/adaptersX"},  # a sibling path, not under the mount
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "key"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "URL", "value": "http://$(IP):8080/$(MISSING)"},
    ]
    mounts = [Mount("/etc/adapters", tmp_path / "a"), Mount("/tmp", tmp_path / "t")]
    resolved = pod_spec.container_env(pod(env), pod(env)["spec"]["containers"][0], lookup, mounts)
    assert resolved == {
        "ADAPTERS_FILE": f"{tmp_path}/a/adapters.json",
        "HOME": f"{tmp_path}/t",
        "OTHER": "/etc/adaptersX",
        "TOKEN": "s3cret",
        "LEVEL": "debug",
        "POD": "p-1",
        "IP": "127.9.0.2",
        "URL": "http://127.9.0.2:8080/$(MISSING)",
    }


def test_a_missing_key_stops_the_pod_unless_optional() -> None:
    ref = {"secretKeyRef": {"name": "tok", "key": "nope"}}
    with pytest.raises(PodSpecError, match="nope"):
        pod_spec.container_env(pod([]), {"env": [{"name": "X", "valueFrom": ref}]}, lookup, [])
    optional = {"secretKeyRef": {**ref["secretKeyRef"], "optional": True}}
    assert pod_spec.container_env(pod([]), {"env": [{"name": "X", "valueFrom": optional}]}, lookup, []) == {}


def test_argv_expands_variables_and_finds_the_executable_on_path() -> None:
    container = {"command": [Path(sys.executable).name, "-c"], "args": ["print('$(WHO)')", "$$(WHO)"]}
    argv = pod_spec.resolve_argv(container, {"WHO": "pod"}, str(Path(sys.executable).parent))
    assert argv == [
        str(Path(sys.executable).parent / Path(sys.executable).name),
        "-c",
        "print('pod')",
        "$(WHO)",
    ]
    with pytest.raises(PodSpecError, match="not found"):
        pod_spec.resolve_argv({"command": ["no-such-binary-xyz"]}, {}, "/nonexistent")


def test_mounts_nest_longest_first(tmp_path: Path) -> None:
    container = {
        "volumeMounts": [{"name": "a", "mountPath": "/etc"}, {"name": "b", "mountPath": "/etc/keys/"}]
    }
    mounts = pod_spec.container_mounts(container, {"a": tmp_path / "a", "b": tmp_path / "b"})
    assert pod_spec.rewrite_path("/etc/keys/k.json", mounts) == f"{tmp_path}/b/k.json"
    assert pod_spec.rewrite_path("/etc/hosts", mounts) == f"{tmp_path}/a/hosts"


def test_configmap_volume_files_follow_the_object(tmp_path: Path) -> None:
    volume = {"name": "adapters", "configMap": {"name": "cfg"}}
    files = pod_spec.volume_files(volume, lookup)
    assert files == {"adapters.json": b'[{"name": "sql"}]', "level": b"debug"}
    assert pod_spec.write_volume(tmp_path, files) is True
    assert pod_spec.write_volume(tmp_path, files) is False  # unchanged: nothing rewritten
    assert pod_spec.write_volume(tmp_path, {"adapters.json": b"[]"}) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.json"]
    assert (tmp_path / "adapters.json").read_bytes() == b"[]"
    assert pod_spec.volume_files({"name": "cache", "emptyDir": {}}, lookup) is None
    with pytest.raises(PodSpecError, match="missing"):
        pod_spec.volume_files({"name": "x", "secret": {"secretName": "missing"}}, lookup)
