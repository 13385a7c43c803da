"""The GPU path compiles (sm_80, sm_90; fp16, bf16, fp32) on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: this catches constructs the
compiler rejects, and checks that adapter weights stream as 16-byte vectors.
"""

from __future__ import annotations

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplex.kernels import triton_lora

TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _compile(fn, arch: int, stages: int, constexprs: dict, float_ptrs: dict[str, str]):
    kernel = triton_lora._kernel(fn, False)
    signature, aligned = {}, {}
    for i, param in enumerate(kernel.params):
        if param.name in constexprs:
            signature[param.name] = "constexpr"
            continue
        if param.name.endswith("_ptr"):
            signature[param.name] = float_ptrs.get(param.name, "*i32")
        else:
            signature[param.name] = "i32"
        if param.name not in triton_lora._NO_SPECIALIZE[fn]:
            aligned[(i,)] = [["tt.divisibility", 16]]  # what the launcher sees for real model shapes
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": 4, "num_stages": stages, "enable_fp_fusion": True},
    )


def _vector_loads(ptx: str) -> int:
    return len(
        re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x10|ld\.global\S*\.v4", ptx)
    )


# stages: 1 is what the launchers pick for decode shapes, 3 for longer loops
@pytest.mark.parametrize(
    ("arch", "dtype", "stages"),
    [(90, "fp16", 1), (90, "bf16", 1), (90, "fp32", 1), (90, "bf16", 3), (80, "bf16", 3)],
)
def test_kernels_compile_for_gpu(arch, dtype, stages, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
    elem = TYPES[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    shrink = _compile(
        triton_lora._shrink_kernel,
        arch,
        stages,
        dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=256, EVEN_K=True, ATOMIC=True, PRECISION=precision),
        {"x_ptr": elem, "a0_ptr": elem, "a1_ptr": elem, "a2_ptr": elem, "y_ptr": "*fp32"},
    )
    expand = _compile(
        triton_lora._expand_kernel,
        arch,
        stages,
        dict(
            BLOCK_M=16,
            BLOCK_N=256,
            BLOCK_R=16,
            RANK_ALIGN=16 // (4 if dtype == "fp32" else 2),
            PRECISION=precision,
        ),
        {"y_ptr": "*fp32", "b0_ptr": elem, "b1_ptr": elem, "b2_ptr": elem, "out_ptr": elem},
    )
    assert shrink.asm["cubin"] and expand.asm["cubin"]
    assert _vector_loads(shrink.asm["ptx"]) > 0
    assert _vector_loads(expand.asm["ptx"]) > 0
