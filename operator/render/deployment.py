"""The Deployment running `loraplex serve`: one pod = one engine with the base model loaded.

Only the pod template's own content decides a rollout: the adapter list lives in a ConfigMap
referenced by name, so adapter changes hot-load instead of restarting pods.
"""

from __future__ import annotations

from typing import Any

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.common import SecretKeyRef
from loraplex.operator.render.access import ACCESS_KEY, access_secret_name
from loraplex.operator.render.configmap import ADAPTERS_KEY
from loraplex.operator.render.credentials import CREDENTIALS_DIR, credentials_mount, credentials_volume
from loraplex.operator.render.meta import (
    READINESS_GATE,
    TEMPLATE_HASH_ANNOTATION,
    RenderOptions,
    child_metadata,
    configmap_name,
    content_hash,
    labels,
    selector_labels,
)
from loraplex.operator.render.network import CONTAINER_PORT, PORT_NAME

ADAPTERS_DIR = "/etc/loraplex/adapters"
ACCESS_DIR = "/etc/loraplex/access"
CACHE_DIR = "/cache"
RUN_AS_USER = 1000
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
SPOT_LABEL = "cloud.google.com/gke-spot"
COMPUTE_CLASS_LABEL = "cloud.google.com/compute-class"
# Scale-down and Spot: on SIGTERM the server keeps serving with /ready at 503 for SHUTDOWN_DELAY
# (routing drops the pod; no preStop hook, so no shell or sleep binary in the image and no
# Kubernetes 1.30 preStop.sleep), then finishes in-flight requests for up to SHUTDOWN_TIMEOUT
# (long generations), and the rest of the grace period is for stopping the engine.
SHUTDOWN_DELAY_SECONDS = 5
SHUTDOWN_TIMEOUT_SECONDS = 90
TERMINATION_GRACE_SECONDS = 120
DRAIN_MARGIN_SECONDS = 5  # handlers writing their final events (2 x 2 s) and the engine stopping


def check_drain_budget(delay_s: float, timeout_s: float, grace_s: float) -> None:
    """The drain budget (docs/errors.md): SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT <= grace - 5 s, so the
    server ends every stream with a `shutdown` error event before the kubelet's SIGKILL."""
    if delay_s < 0 or timeout_s < 0 or delay_s + timeout_s > grace_s - DRAIN_MARGIN_SECONDS:
        raise ValueError(
            f"drain budget: SHUTDOWN_DELAY ({delay_s:g} s) + SHUTDOWN_TIMEOUT ({timeout_s:g} s) must be "
            f"<= terminationGracePeriodSeconds ({grace_s:g} s) - {DRAIN_MARGIN_SECONDS} s"
        )


# Requests when the spec leaves them out, by whether the pod has GPUs (Autopilot needs them explicit).
DEFAULT_RESOURCES = {
    False: {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "20Gi"},
    True: {"cpu": "4", "memory": "24Gi", "ephemeral-storage": "50Gi"},
}
SHM_SIZE = "1Gi"

# (path, period s, failure threshold, timeout s). Startup allows an hour: a cold model download.
PROBES = {
    "startupProbe": ("/health", 10, 360, 5),
    "readinessProbe": ("/ready", 5, 3, 3),
    "livenessProbe": ("/health", 15, 4, 5),
}


def build_deployment(bmd: BaseModelDeployment, options: RenderOptions) -> dict[str, Any]:
    template = build_pod_template(bmd, options)
    metadata = child_metadata(bmd, bmd.name)
    metadata["annotations"] = {
        TEMPLATE_HASH_ANNOTATION: template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": bmd.spec.replicas,
            "selector": {"matchLabels": selector_labels(bmd)},
            # Surge first: a new pod loads model and adapters before an old one goes away.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def build_pod_template(bmd: BaseModelDeployment, options: RenderOptions) -> dict[str, Any]:
    """The pod template, annotated with a hash of itself (for drift checks and rollouts)."""
    template = {"metadata": {"labels": labels(bmd)}, "spec": build_pod_spec(bmd, options)}
    template["metadata"]["annotations"] = {TEMPLATE_HASH_ANNOTATION: content_hash(template)}
    return template


def build_pod_spec(bmd: BaseModelDeployment, options: RenderOptions) -> dict[str, Any]:
    spec = bmd.spec
    check_drain_budget(SHUTDOWN_DELAY_SECONDS, SHUTDOWN_TIMEOUT_SECONDS, TERMINATION_GRACE_SECONDS)
    pod: dict[str, Any] = {
        "containers": [build_server_container(bmd, options)],
        "volumes": _volumes(bmd),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The server never talks to the API server; GCS access uses Workload Identity, not a token.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
    }
    if node_selector := _node_selector(bmd):
        pod["nodeSelector"] = node_selector
    if tolerations := _tolerations(bmd):
        pod["tolerations"] = tolerations
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.readiness_gate:
        pod["readinessGates"] = [{"conditionType": READINESS_GATE}]
    return pod


def build_server_container(bmd: BaseModelDeployment, options: RenderOptions) -> dict[str, Any]:
    spec = bmd.spec
    container: dict[str, Any] = {
        "name": "server",
        "image": spec.image or options.default_image,
        "imagePullPolicy": spec.image_pull_policy.value,
        "command": ["loraplex", "serve"],
        "env": build_env(bmd),
        "ports": [{"name": PORT_NAME, "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "resources": build_resources(bmd),
        "volumeMounts": [
            {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
            {"name": "access", "mountPath": ACCESS_DIR, "readOnly": True},
            credentials_mount(),
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    for probe, (path, period, failures, timeout) in PROBES.items():
        container[probe] = {
            "httpGet": {"path": path, "port": PORT_NAME},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": timeout,
        }
    return container


def build_env(bmd: BaseModelDeployment) -> list[dict[str, Any]]:
    """Engine settings as `loraplex serve` reads them (TGI-style names); unset optionals left out."""
    spec, engine = bmd.spec, bmd.spec.engine
    values: dict[str, object | None] = {
        "MODEL_ID": spec.model.id,
        "REVISION": spec.model.revision,
        "SERVED_MODEL_NAME": bmd.served_name,
        "DTYPE": spec.model.dtype.value,
        "DEVICE": "cpu" if spec.accelerator is None else "cuda",
        "PORT": CONTAINER_PORT,
        # Kubernetes sets HOSTNAME to the pod name; the server (like TGI) reads it as the bind
        # address, so pin it to every interface or probes and port-forward can't connect.
        "HOSTNAME": "0.0.0.0",
        "ADAPTERS_FILE": f"{ADAPTERS_DIR}/{ADAPTERS_KEY}",
        "ADAPTER_KEYS_FILE": f"{ACCESS_DIR}/{ACCESS_KEY}",
        "CREDENTIALS_DIR": CREDENTIALS_DIR,
        "MAX_LORAS": engine.max_loras,
        "MAX_CPU_LORAS": engine.max_cpu_loras,
        "MAX_LORA_RANK": engine.max_lora_rank,
        "MAX_BATCH_PREFILL_TOKENS": engine.max_batch_tokens,
        "MAX_CONCURRENT_REQUESTS": engine.max_concurrent_requests,
        "MAX_INPUT_TOKENS": engine.max_input_tokens,
        "MAX_TOTAL_TOKENS": engine.max_total_tokens,
        "KV_CACHE_MEMORY_FRACTION": engine.kv_cache_memory_fraction,
        "CUDA_GRAPHS": str(engine.cuda_graphs).lower(),
        # Read-only root filesystem: every cache goes to the cache volume.
        "HOME": "/tmp",
        "HF_HOME": f"{CACHE_DIR}/huggingface",
        "ADAPTER_CACHE_DIR": f"{CACHE_DIR}/adapters",
        "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
        "SHUTDOWN_DELAY": SHUTDOWN_DELAY_SECONDS,
        "SHUTDOWN_TIMEOUT": SHUTDOWN_TIMEOUT_SECONDS,
    }
    env = [{"name": name, "value": str(value)} for name, value in values.items() if value is not None]
    env += [_field_env("POD_NAME", "metadata.name"), _field_env("POD_NAMESPACE", "metadata.namespace")]
    for name, ref in (("HF_TOKEN", spec.hf_token_secret_ref), ("API_KEY", spec.api_key_secret_ref)):
        if ref is not None:
            env.append(_secret_env(name, ref))
    return env


def build_resources(bmd: BaseModelDeployment) -> dict[str, Any]:
    """Requests for cpu, memory and ephemeral storage; limits on memory, storage and GPUs. No CPU
    limit: throttling a tokenizer-bound server helps nobody (Autopilot sets it to the request)."""
    accelerator = bmd.spec.accelerator
    requests = dict(DEFAULT_RESOURCES[accelerator is not None])
    given = bmd.spec.resources
    for key, value in (
        ("cpu", given.cpu),
        ("memory", given.memory),
        ("ephemeral-storage", given.ephemeral_storage),
    ):
        if value is not None:
            requests[key] = value
    limits = {key: requests[key] for key in ("memory", "ephemeral-storage")}
    if accelerator is not None:
        limits[GPU_RESOURCE] = str(accelerator.count)
    return {"requests": requests, "limits": limits}


def _volumes(bmd: BaseModelDeployment) -> list[dict[str, Any]]:
    cache_size = build_resources(bmd)["requests"]["ephemeral-storage"]
    return [
        {"name": "adapters", "configMap": {"name": configmap_name(bmd)}},
        # Key digests only; written before the Deployment, so pods never start without it.
        {"name": "access", "secret": {"secretName": access_secret_name(bmd), "defaultMode": 0o440}},
        credentials_volume(bmd),  # only the keys named by adapters' credentialsSecretRef
        {"name": "cache", "emptyDir": {"sizeLimit": cache_size}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]


def _node_selector(bmd: BaseModelDeployment) -> dict[str, str]:
    scheduling, accelerator = bmd.spec.scheduling, bmd.spec.accelerator
    selector = dict(scheduling.node_selector)
    if accelerator is not None:
        selector[ACCELERATOR_LABEL] = accelerator.type
    if scheduling.spot:
        selector[SPOT_LABEL] = "true"
    if scheduling.compute_class:
        selector[COMPUTE_CLASS_LABEL] = scheduling.compute_class
    return selector


def _tolerations(bmd: BaseModelDeployment) -> list[dict[str, Any]]:
    """The user's tolerations plus the taints GKE puts on GPU and Spot nodes (Autopilot adds
    them itself; GKE Standard node pools need them)."""
    tolerations = [toleration.to_k8s() for toleration in bmd.spec.scheduling.tolerations]
    if bmd.spec.accelerator is not None:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if bmd.spec.scheduling.spot:
        tolerations.append({"key": SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"})
    return tolerations


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
