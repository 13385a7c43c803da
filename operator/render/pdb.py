"""PodDisruptionBudget: voluntary disruptions (node drains, upgrades) take one pod at a time."""

from __future__ import annotations

from typing import Any

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.render.meta import RenderOptions, child_metadata, selector_labels


def build_pdb(bmd: BaseModelDeployment, options: RenderOptions) -> dict[str, Any]:
    # maxUnavailable 1 keeps a replica serving whenever there are two or more, yet never blocks
    # a drain of a single-replica deployment forever (minAvailable 1 would).
    spec: dict[str, Any] = {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(bmd)}}
    if options.pdb_api_version == "policy/v1":
        # A pod stuck unready (adapters failing to load) must not block a drain.
        spec["unhealthyPodEvictionPolicy"] = "AlwaysAllow"
    return {
        "apiVersion": options.pdb_api_version,
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(bmd, bmd.name),
        "spec": spec,
    }
