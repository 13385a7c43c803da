"""Load the bench/ scripts as modules (bench/ is not a package; its scripts import each other by name)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str) -> ModuleType:
    """Import bench/<name>.py; bench/ is on sys.path only meanwhile, so its `kernels.py` never
    shadows a package of that name for the rest of the session."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="session")
def bench_serve() -> ModuleType:
    return load_bench("serve")


@pytest.fixture(scope="session")
def bench_engine() -> ModuleType:
    return load_bench("engine")


@pytest.fixture(scope="session")
def bench_suite() -> ModuleType:
    return load_bench("run_suite")


@pytest.fixture(scope="session")
def bench_plots() -> ModuleType:
    return load_bench("plots")


@pytest.fixture(scope="session")
def bench_checkpoint() -> ModuleType:
    return load_bench("random_checkpoint")


@pytest.fixture(scope="session")
def bench_baselines() -> ModuleType:
    return load_bench("baselines")
