"""The demo workload of the local cluster: the trained tiny Llama and its fine-tunes as files,
and the sample manifests of `e2e/demo/` filled in with their paths (used by `make demo`, the
e2e suite on the local cluster and the operator envtests)."""

from __future__ import annotations

import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.demo_assets import AdapterRecipe, build_adapter
from loraplex.server.demo_training import BASE_NAME, Report, build_trained_assets

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "demo"
BASE_MODEL = BASE_NAME  # metadata.name in base-model.yaml
SERVED = ("sql", "support", "poem")  # adapters.yaml
LIVE = "haiku"  # adapter-live.yaml, hot-loaded into the running pods
# Random weights above the base's maxLoraRank (16): an adapter every pod must refuse.
TOO_BIG = AdapterRecipe("r32", rank=32, alpha=32, target_modules=("q_proj", "v_proj"), seed=15)


@dataclass(frozen=True)
class Workload:
    model_dir: Path
    adapters: dict[str, Path]  # sql, support, poem, haiku (trained), r32 (too big) -> PEFT directory

    def variables(self) -> dict[str, str]:
        values = {"MODEL_DIR": str(self.model_dir)}
        values.update({f"ADAPTER_{name.upper()}": str(path) for name, path in self.adapters.items()})
        return values


def build_workload(root: Path | None = None, report: Report = print) -> Workload:
    """Train (or reuse) the demo's models under `root` (default: the demo-assets cache), plus
    the too-big adapter."""
    assets = build_trained_assets(root, report)
    adapters = dict(assets.adapters)
    target = assets.root / "extra" / TOO_BIG.name
    if not (target / "adapter_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{TOO_BIG.name}-", dir=target.parent))
        build_adapter(assets.model_dir, TOO_BIG, staging, base_name=BASE_MODEL)
        os.replace(staging, target)  # a half-built adapter never looks complete
    adapters[TOO_BIG.name] = target
    return Workload(model_dir=assets.model_dir, adapters=adapters)


def manifest(name: str, workload: Workload) -> str:
    """`e2e/demo/<name>` with the workload's paths filled in."""
    return string.Template((MANIFEST_DIR / name).read_text()).substitute(workload.variables())
