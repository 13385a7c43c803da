"""The demo workload of the local cluster: the tiny Llama and its adapters as files, and the
sample manifests of `e2e/demo/` filled in with their paths (used by `make demo`, the e2e suite
on the local cluster and the operator envtest)."""

from __future__ import annotations

import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.demo_assets import ATTENTION, AdapterRecipe, build_adapter, build_tiny_assets

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "demo"
BASE_MODEL = "tiny-llama"  # metadata.name in base-model.yaml
# Adapters beyond the three of demo_assets: one more to hot-load, one above maxLoraRank (16).
EXTRA_RECIPES = (
    AdapterRecipe("d8", rank=8, alpha=16, target_modules=ATTENTION, seed=14),
    AdapterRecipe("r32", rank=32, alpha=32, target_modules=("q_proj", "v_proj"), seed=15),
)


@dataclass(frozen=True)
class Workload:
    model_dir: Path
    adapters: dict[str, Path]  # recipe name (a4, b8, c16, d8, r32) -> PEFT directory

    def variables(self) -> dict[str, str]:
        values = {"MODEL_DIR": str(self.model_dir)}
        values.update({f"ADAPTER_{name.upper()}": str(path) for name, path in self.adapters.items()})
        return values


def build_workload(root: Path) -> Workload:
    """Build (or reuse) the tiny assets under `root` plus the extra adapters."""
    assets = build_tiny_assets(root)
    model_dir = assets.models["llama"]
    adapters = dict(assets.adapters["llama"])
    for recipe in EXTRA_RECIPES:
        target = assets.root / "adapters" / "extra" / recipe.name
        if not (target / "adapter_config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=target.parent))
            build_adapter(model_dir, recipe, staging, base_name=BASE_MODEL)
            os.replace(staging, target)  # a half-built adapter never looks complete
        adapters[recipe.name] = target
    return Workload(model_dir=model_dir, adapters=adapters)


def manifest(name: str, workload: Workload) -> str:
    """`e2e/demo/<name>` with the workload's paths filled in."""
    return string.Template((MANIFEST_DIR / name).read_text()).substitute(workload.variables())
