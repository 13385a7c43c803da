"""The fused kernels compile for the GPU (sm_80, sm_90; fp16, bf16, fp32) on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: this catches constructs the
compiler rejects (helper calls, branches on runtime values, dtype mixes).
"""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplex.kernels import triton_common, triton_fused

TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
INT_PTRS = {"pos_ptr": "*i64", "slot_ptr": "*i64"}
FLOAT_ARGS = {"eps", "offset", "scaling"}
KERNELS = {
    "add_rmsnorm": (
        triton_fused._add_rmsnorm_kernel,
        {"HAS_RESIDUAL": True, "HAS_OFFSET": True, "BLOCK": 4096},
    ),
    "llama_norm": (
        triton_fused._add_rmsnorm_kernel,
        {"HAS_RESIDUAL": False, "HAS_OFFSET": False, "BLOCK": 2048},
    ),
    "rope_kv": (triton_fused._rope_kv_kernel, {"HALF": 64, "BLOCK": 64}),
    "act_mul_silu": (triton_fused._act_mul_kernel, {"ACT": 0, "BLOCK": 1024}),
    "act_mul_gelu_tanh": (triton_fused._act_mul_kernel, {"ACT": 1, "BLOCK": 1024}),
    "act_mul_gelu": (triton_fused._act_mul_kernel, {"ACT": 2, "BLOCK": 1024}),
}


def _compile(fn, arch: int, constexprs: dict, elem: str):
    kernel = triton_common.kernel(fn, False)
    signature = {}
    for param in kernel.params:
        if param.name in constexprs:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = INT_PTRS.get(
                param.name, "*fp32" if param.name == "inv_freq_ptr" else elem
            )
        else:
            signature[param.name] = "fp32" if param.name in FLOAT_ARGS else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "enable_fp_fusion": False}
    )


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (90, "fp16"), (80, "fp32")])
def test_fused_kernels_compile_for_gpu(name, arch, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
    fn, constexprs = KERNELS[name]
    compiled = _compile(fn, arch, constexprs, TYPES[dtype])
    assert compiled.asm["cubin"]
    if name == "rope_kv":
        # positions reach thousands of radians: cos/sin must be the accurate libdevice ones
        assert "cos.approx" not in compiled.asm["ptx"] and "sin.approx" not in compiled.asm["ptx"]
