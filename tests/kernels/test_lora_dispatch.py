"""Backend choice of loraplex.kernels.lora."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import lora
from loraplex.kernels.lora import BACKEND_ENV, kernel_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_triton_on_cuda_and_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernel_backend(CUDA) == "triton"
    assert kernel_backend(CPU) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_backend(CPU) == "triton"


def test_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert kernel_backend(CUDA) == "reference"
    monkeypatch.setenv(BACKEND_ENV, "Triton")
    assert kernel_backend(CPU) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "cutlass")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        kernel_backend(CPU)


def test_public_ops_run_the_reference_on_cpu(lora_checks, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = lora_checks.make_case(9, (8, 16, 0), (24, 8, 8), in_features=32, seed=5)
    lora_checks.check_shrink(lora.lora_shrink, case)
    lora_checks.check_expand(lora.lora_expand, case, add=True)
    lora_checks.check_expand(lora.lora_expand, case, add=False)


def test_a_backend_passed_by_the_caller_wins_over_the_environment(lora_checks, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cutlass")  # would raise if the op read it
    case = lora_checks.make_case(4, (8, 16), (16,), in_features=16, seed=6)

    def shrink(x, a, meta):
        return lora.lora_shrink(x, a, meta, backend="reference")

    def expand(y, b, meta, out, add):
        return lora.lora_expand(y, b, meta, out, add=add, backend="triton")

    lora_checks.check_shrink(shrink, case)
    lora_checks.check_expand(expand, case, add=True)
    with pytest.raises(ValueError, match="backend"):
        lora.lora_shrink(case.x, case.a_slots, case.meta, backend="Triton")
