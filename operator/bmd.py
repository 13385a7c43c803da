"""BaseModelDeployment (`bmd`): one base model served by N pods that hot-load many adapters.

The spec and status models here are the single source of the CRD schema (`crdgen`); the
operator parses every event's spec with `BaseModelDeploymentSpec.model_validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from loraplex.operator.common import (
    Condition,
    K8sModel,
    LabelSelector,
    Quantity,
    SecretKeyRef,
    list_map,
    section,
)

KIND = "BaseModelDeployment"
PLURAL = "basemodeldeployments"


class Dtype(StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class ModelSpec(K8sModel):
    """The base model. `id`: a hub repo id, `hf://org/repo`, `gs://bucket/path` or `file:///abs/path`."""

    id: str = Field(min_length=1, max_length=1024)
    revision: str | None = Field(default=None, max_length=256)
    served_name: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._:-]*[A-Za-z0-9])?$",
        description="Name clients use for the base model; defaults to metadata.name.",
    )
    dtype: Dtype = Dtype.AUTO


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


# The engine runs one model replica on one device (no tensor parallelism yet): more GPUs per pod
# would be requested and billed for nothing, so the CRD refuses them (CEL) and so does the operator.
MAX_ACCELERATORS_PER_POD = 1


class AcceleratorSpec(K8sModel):
    """GPUs per pod; `type` is the GKE accelerator name (nvidia-l4, nvidia-h100-80gb, ...)."""

    type: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    count: int = Field(
        default=1,
        ge=1,
        le=16,
        description="GPUs per pod. Only 1 is accepted until the engine uses more than one device.",
    )

    @model_validator(mode="after")
    def _one_device(self) -> AcceleratorSpec:
        if self.count > MAX_ACCELERATORS_PER_POD:
            raise ValueError(ACCELERATOR_COUNT_MESSAGE)
        return self


ACCELERATOR_COUNT_MESSAGE = (
    "accelerator.count must be 1: the engine uses one device per pod (scale out with replicas)"
)


class ResourcesSpec(K8sModel):
    """Requests (and equal limits) per pod; unset values take the operator's defaults."""

    cpu: Quantity | None = None
    memory: Quantity | None = None
    ephemeral_storage: Quantity | None = Field(
        default=None, description="Sizes the model and adapter cache volume, too."
    )


class EngineSpec(K8sModel):
    """Engine limits, passed to `loraplex serve` as environment variables."""

    max_loras: int = Field(default=8, ge=1, le=256, description="Adapters resident in GPU slots at once.")
    max_cpu_loras: int = Field(default=64, ge=1, le=4096, description="Adapters kept in host memory.")
    max_lora_rank: int = Field(default=64, ge=1, le=1024)
    max_batch_tokens: int = Field(default=8192, ge=16, description="Tokens per prefill step.")
    max_concurrent_requests: int = Field(default=128, ge=1)
    max_input_tokens: int | None = Field(default=None, ge=1)
    max_total_tokens: int | None = Field(default=None, ge=2)
    kv_cache_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    cuda_graphs: bool = True


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(K8sModel):
    key: str | None = None
    operator: TolerationOperator = TolerationOperator.EQUAL
    value: str | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None


class SchedulingSpec(K8sModel):
    spot: bool = Field(default=False, description="Run on Spot capacity (cloud.google.com/gke-spot).")
    compute_class: str | None = Field(default=None, description="GKE ComputeClass name.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = None
    autopilot: bool = Field(
        default=False,
        description=(
            "The cluster is GKE Autopilot: the operator checks the pods against Autopilot's admission "
            "rules and reports AutopilotRejected (with the rule) instead of applying a Deployment whose "
            "pods Autopilot would refuse."
        ),
    )


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class ServiceSpec(K8sModel):
    type: ServiceType = ServiceType.CLUSTER_IP
    port: int = Field(default=8080, ge=1, le=65535)


class NamespacesFrom(StrEnum):
    SAME = "Same"
    ALL = "All"
    SELECTOR = "Selector"


class AdapterNamespaces(K8sModel):
    """Which namespaces' LoraAdapters may attach (like Gateway API listeners admitting routes)."""

    from_: NamespacesFrom = Field(default=NamespacesFrom.SAME, alias="from")
    selector: LabelSelector | None = Field(default=None, description="Namespace labels, for from: Selector.")

    @model_validator(mode="after")
    def _selector_when_needed(self) -> AdapterNamespaces:
        if self.from_ == NamespacesFrom.SELECTOR and self.selector is None:
            raise ValueError("adapterNamespaces.selector is required when from is Selector")
        return self


class ScalingMetric(StrEnum):
    QUEUE_DEPTH = "queueDepth"
    RUNNING_REQUESTS = "runningRequests"
    KV_CACHE_USAGE = "kvCacheUsage"


class AutoscalingProvider(StrEnum):
    HPA = "HPA"
    KEDA = "KEDA"


class AutoscalingSpec(K8sModel):
    """Scales `spec.replicas` through the scale subresource on a per-pod engine metric."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(ge=1)
    metric: ScalingMetric = ScalingMetric.QUEUE_DEPTH
    target: float = Field(default=4.0, gt=0, description="Per-pod target value of the metric.")
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)
    provider: AutoscalingProvider = AutoscalingProvider.HPA
    metric_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[^/%]+$",
        description=(
            "HPA: the name the custom-metrics adapter serves the metric under; default the Prometheus "
            "name (vllm:num_requests_waiting, ...). GKE's Stackdriver adapter with Managed Prometheus: "
            "prometheus.googleapis.com|vllm:num_requests_waiting|gauge."
        ),
    )
    server_address: str | None = Field(
        default=None,
        max_length=1024,
        description="KEDA: the Prometheus URL its prometheus trigger queries (required for provider KEDA).",
    )

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
        if self.provider == AutoscalingProvider.KEDA and not self.server_address:
            raise ValueError("autoscaling.serverAddress is required when the provider is KEDA")
        return self


class FailureMode(StrEnum):
    FAIL_OPEN = "FailOpen"
    FAIL_CLOSE = "FailClose"


class EndpointPickerRef(K8sModel):
    """The Endpoint Picker (EPP) Service an InferencePool v1 points at."""

    name: str = Field(min_length=1, max_length=253)
    kind: str = "Service"
    group: str | None = Field(default=None, description="API group of `kind`; unset = core.")
    port: int = Field(default=9002, ge=1, le=65535)
    failure_mode: FailureMode = FailureMode.FAIL_CLOSE


class InferencePoolSpec(K8sModel):
    enabled: bool = False
    endpoint_picker_ref: EndpointPickerRef | None = None

    @model_validator(mode="after")
    def _picker_when_enabled(self) -> InferencePoolSpec:
        if self.enabled and self.endpoint_picker_ref is None:
            raise ValueError("routing.inferencePool.endpointPickerRef is required when the pool is enabled")
        return self


class RoutingSpec(K8sModel):
    inference_pool: InferencePoolSpec = section(
        InferencePoolSpec, "Gateway API Inference Extension InferencePool (v1) over the pods."
    )


class BaseModelDeploymentSpec(K8sModel):
    model: ModelSpec
    hf_token_secret_ref: SecretKeyRef | None = None
    replicas: int = Field(default=1, ge=0)
    image: str | None = Field(default=None, description="Server image; defaults to the operator's.")
    image_pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    service_account_name: str | None = Field(
        default=None, description="Pod ServiceAccount, e.g. one bound by Workload Identity for gs://."
    )
    accelerator: AcceleratorSpec | None = Field(default=None, description="Absent = CPU pods.")
    resources: ResourcesSpec = section(ResourcesSpec)
    engine: EngineSpec = section(EngineSpec)
    scheduling: SchedulingSpec = section(SchedulingSpec)
    service: ServiceSpec = section(ServiceSpec)
    api_key_secret_ref: SecretKeyRef | None = None
    readiness_gate: bool = Field(
        default=True, description="A pod takes traffic only once every adapter is loaded on it."
    )
    adapter_namespaces: AdapterNamespaces = section(AdapterNamespaces)
    autoscaling: AutoscalingSpec | None = None
    routing: RoutingSpec = section(RoutingSpec)


class BmdPhase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    LOADING = "Loading"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class AdapterCounts(K8sModel):
    desired: int = 0
    ready: int = 0
    failed: int = 0


class PodReport(K8sModel):
    """One server pod as the operator last saw it."""

    name: str
    ip: str | None = None
    ready: bool = False
    engine_epoch: str | None = Field(default=None, description="Changes whenever the container restarts.")
    adapters_loaded: int = 0


class BaseModelDeploymentStatus(K8sModel):
    observed_generation: int | None = None
    phase: BmdPhase | None = None
    conditions: list[Condition] = list_map("type")
    replicas: int = 0
    ready_replicas: int = 0
    selector: str | None = Field(default=None, description="Pod label selector (scale subresource).")
    endpoint: str | None = None
    adapters: AdapterCounts = Field(default_factory=AdapterCounts)
    pods: list[PodReport] = list_map("name")


# CEL rules for real clusters (1.25+); the model validators above enforce the same in the
# operator (an InvalidSpec condition), for API servers without CEL.
SPEC_VALIDATIONS = [
    {
        "rule": "!has(self.autoscaling) || (self.autoscaling.minReplicas <= self.autoscaling.maxReplicas"
        " && (self.autoscaling.provider != 'KEDA' || has(self.autoscaling.serverAddress)))",
        "message": "autoscaling.minReplicas must not exceed autoscaling.maxReplicas, and provider KEDA"
        " needs autoscaling.serverAddress",
    },
    {
        "rule": "self.adapterNamespaces.from != 'Selector' || has(self.adapterNamespaces.selector)",
        "message": "adapterNamespaces.selector is required when from is Selector",
    },
    {
        "rule": "!self.routing.inferencePool.enabled || has(self.routing.inferencePool.endpointPickerRef)",
        "message": "routing.inferencePool.endpointPickerRef is required when the pool is enabled",
    },
    {
        "rule": f"!has(self.accelerator) || self.accelerator.count <= {MAX_ACCELERATORS_PER_POD}",
        "message": ACCELERATOR_COUNT_MESSAGE,
    },
]


@dataclass(frozen=True)
class BaseModelDeployment:
    """One BaseModelDeployment object: identity plus the validated spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: BaseModelDeploymentSpec

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> BaseModelDeployment:
        """Parse a kopf/API body; raises pydantic.ValidationError on a spec the schema let through."""
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation", 0)),
            spec=BaseModelDeploymentSpec.model_validate(body.get("spec") or {}),
        )

    @property
    def served_name(self) -> str:
        return self.spec.model.served_name or self.name
