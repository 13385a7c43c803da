"""Session-wide fixtures: generated tiny models/adapters and the local control plane."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.server.demo_assets import TinyAssets, build_tiny_assets

# `local_cluster`: real etcd + kube-apiserver + kube-controller-manager for `envtest` tests;
# `gcs_server`, `s3_server` and their buckets: real storage servers on loopback.
pytest_plugins = ["loraplex.localcluster.pytest_plugin", "loraplex.localcluster.object_stores"]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny Llama and Gemma2 checkpoints, a trained BPE tokenizer and three PEFT adapters each.

    Built once per test session from fixed seeds (deterministic), in the session's temp dir.
    """
    return build_tiny_assets(Path(tmp_path_factory.mktemp("tiny-assets")))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run many times faster on one torch thread."""
    import torch

    torch.set_num_threads(1)
    yield
