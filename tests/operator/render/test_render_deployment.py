"""Deployment rendering: engine env, secrets, volumes, probes, GKE scheduling, rollout hash."""

from __future__ import annotations

from typing import Any

from loraplex.operator.render import RenderOptions, build_deployment
from loraplex.operator.render.meta import READINESS_GATE, TEMPLATE_HASH_ANNOTATION

OPTIONS = RenderOptions(default_image="example.com/loraplex:1")


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(deployment)["containers"]
    return container


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in _container(deployment)["env"]}


def _hash(deployment: dict[str, Any]) -> str:
    return deployment["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]


def test_engine_settings_become_server_env(bmd, make_bmd) -> None:
    tuned = make_bmd(engine={"maxLoras": 16, "maxInputTokens": 2048, "cudaGraphs": False}, model={"id": "m"})
    env = _env(build_deployment(tuned, OPTIONS))
    assert _container(build_deployment(bmd, OPTIONS))["command"] == ["loraplex", "serve"]
    assert env["MODEL_ID"] == "m"
    assert env["SERVED_MODEL_NAME"] == "gemma"
    assert (env["MAX_LORAS"], env["MAX_CPU_LORAS"], env["MAX_LORA_RANK"]) == ("16", "64", "64")
    assert (env["MAX_BATCH_PREFILL_TOKENS"], env["MAX_CONCURRENT_REQUESTS"]) == ("8192", "128")
    assert env["MAX_INPUT_TOKENS"] == "2048"
    assert "MAX_TOTAL_TOKENS" not in env  # unset: the server picks from the model config
    assert env["CUDA_GRAPHS"] == "false"
    assert env["PORT"] == "8080"
    assert env["DEVICE"] == "cpu"
    assert _env(build_deployment(make_bmd(accelerator={"type": "nvidia-l4"}), OPTIONS))["DEVICE"] == "cuda"
    assert env["ADAPTERS_FILE"] == "/etc/loraplex/adapters/adapters.json"
    assert all(
        isinstance(item.get("value", ""), str) for item in _container(build_deployment(tuned, OPTIONS))["env"]
    )


def test_secrets_reach_the_pod_only_as_the_named_keys(bmd, make_bmd) -> None:
    assert "HF_TOKEN" not in _env(build_deployment(bmd, OPTIONS))
    with_secrets = make_bmd(
        hfTokenSecretRef={"name": "hf", "key": "token"}, apiKeySecretRef={"name": "keys", "key": "server"}
    )
    deployment = build_deployment(with_secrets, OPTIONS)
    env = _env(deployment)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["API_KEY"] == {"secretKeyRef": {"name": "keys", "key": "server"}}
    assert "envFrom" not in _container(deployment)
    secrets = [v["secret"]["secretName"] for v in _pod(deployment)["volumes"] if "secret" in v]
    # operator-owned: key digests, and the adapters' store keys copied key by key; never the named Secrets
    assert secrets == ["gemma-access", "gemma-credentials"]


def test_volumes_mount_adapter_list_cache_and_shm(make_bmd) -> None:
    deployment = build_deployment(make_bmd(resources={"ephemeralStorage": "80Gi"}), OPTIONS)
    volumes = {volume["name"]: volume for volume in _pod(deployment)["volumes"]}
    assert volumes["adapters"]["configMap"] == {"name": "gemma-adapters"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "80Gi"}
    mounts = {mount["name"]: mount for mount in _container(deployment)["volumeMounts"]}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert mounts["adapters"] == {"name": "adapters", "mountPath": "/etc/loraplex/adapters", "readOnly": True}
    assert set(mounts) == set(volumes)


def test_probes_use_health_and_ready(bmd) -> None:
    container = _container(build_deployment(bmd, OPTIONS))
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # A cold start downloads the model: the startup probe must allow far longer than liveness.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_cpu_pod_has_no_gpu_and_no_accelerator_selector(bmd) -> None:
    deployment = build_deployment(bmd, OPTIONS)
    resources = _container(deployment)["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    assert set(resources["requests"]) == {"cpu", "memory", "ephemeral-storage"}
    assert "nodeSelector" not in _pod(deployment)
    assert "tolerations" not in _pod(deployment)


def test_gke_autopilot_gpu_spot_and_compute_class(make_bmd) -> None:
    gpu = make_bmd(
        accelerator={"type": "nvidia-l4", "count": 1},
        resources={"cpu": 8, "memory": "32Gi"},
        scheduling={
            "spot": True,
            "computeClass": "l4-spot",
            "nodeSelector": {"team": "ml"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "priorityClassName": "inference",
        },
    )
    deployment = build_deployment(gpu, OPTIONS)
    pod = _pod(deployment)
    assert pod["nodeSelector"] == {
        "team": "ml",
        "cloud.google.com/gke-accelerator": "nvidia-l4",
        "cloud.google.com/gke-spot": "true",
        "cloud.google.com/compute-class": "l4-spot",
    }
    resources = _container(deployment)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["cpu"] == "8"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "32Gi"
    keys = [toleration["key"] for toleration in pod["tolerations"]]
    assert keys == ["dedicated", "nvidia.com/gpu", "cloud.google.com/gke-spot"]
    assert pod["priorityClassName"] == "inference"


def test_pod_runs_non_root_without_api_token(bmd, make_bmd) -> None:
    deployment = build_deployment(bmd, OPTIONS)
    pod, container = _pod(deployment), _container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == "example.com/loraplex:1"
    assert _container(build_deployment(make_bmd(image="mine:2"), OPTIONS))["image"] == "mine:2"


def test_readiness_gate_follows_spec(bmd, make_bmd) -> None:
    assert _pod(build_deployment(bmd, OPTIONS))["readinessGates"] == [{"conditionType": READINESS_GATE}]
    assert "readinessGates" not in _pod(build_deployment(make_bmd(readinessGate=False), OPTIONS))


def test_owner_labels_and_selector(bmd) -> None:
    deployment = build_deployment(bmd, OPTIONS)
    assert deployment["metadata"]["namespace"] == "llm"
    (owner,) = deployment["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "BaseModelDeployment",
        "name": "gemma",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/managed-by"] == "loraplex-operator"


def test_template_hash_changes_with_pod_spec_only(bmd, make_bmd) -> None:
    base = _hash(build_deployment(bmd, OPTIONS))
    assert base == _hash(build_deployment(make_bmd(), OPTIONS))  # deterministic
    assert _hash(build_deployment(make_bmd(replicas=5), OPTIONS)) == base  # scaling never rolls pods
    assert _hash(build_deployment(make_bmd(service={"port": 9000}), OPTIONS)) == base
    assert _hash(build_deployment(make_bmd(engine={"maxLoras": 4}), OPTIONS)) != base
    deployment = build_deployment(make_bmd(replicas=5), OPTIONS)
    assert deployment["spec"]["replicas"] == 5
    assert deployment["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] == base
