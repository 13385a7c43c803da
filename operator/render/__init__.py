"""Pure rendering of a BaseModelDeployment's children: spec in, Kubernetes objects (dicts) out.

No I/O here: `loraplex.operator.k8s` applies what these functions return.
"""

from loraplex.operator.render.access import build_access_secret
from loraplex.operator.render.autoscaling import build_hpa, build_scaled_object
from loraplex.operator.render.configmap import build_configmap
from loraplex.operator.render.deployment import build_deployment
from loraplex.operator.render.meta import RenderOptions, label_selector_string
from loraplex.operator.render.network import build_inference_pool, build_service, service_endpoint
from loraplex.operator.render.pdb import build_pdb

__all__ = [
    "RenderOptions",
    "build_access_secret",
    "build_configmap",
    "build_deployment",
    "build_hpa",
    "build_inference_pool",
    "build_pdb",
    "build_scaled_object",
    "build_service",
    "label_selector_string",
    "service_endpoint",
]
