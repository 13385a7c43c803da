"""The ConfigMap holding a base model's desired adapter list (mounted; loaded by pods at start)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.desired import DesiredAdapter, adapters_to_json
from loraplex.operator.render.meta import child_metadata, configmap_name

ADAPTERS_KEY = "adapters.json"


def build_configmap(bmd: BaseModelDeployment, adapters: Iterable[DesiredAdapter]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(bmd, configmap_name(bmd)),
        "data": {ADAPTERS_KEY: adapters_to_json(adapters)},
    }
