"""What the Triton launchers share: kernel objects for GPU or interpreter, dot precision, SM count."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# tl.max and tl.sum are @jit wrappers that a kernel run by the interpreter without
# TRITON_INTERPRET cannot call; tl.reduce with Triton's own combine functions works in both
# (and the interpreter recognises them and reduces with numpy).
MAX = tl.standard._elementwise_max
SUM = tl.standard._sum_combine


@functools.cache
def kernel(fn: Callable, interpret: bool, do_not_specialize: tuple[str, ...] = ()):
    """`fn` compiled for the GPU, or run by Triton's interpreter for CPU tensors.

    Chosen per call rather than by `@triton.jit` at import time (which reads TRITON_INTERPRET
    once): a test process can then mix CPU interpreter runs with anything else.
    """
    if interpret:
        return InterpretedFunction(fn)
    return JITFunction(fn, do_not_specialize=list(do_not_specialize))


def dot_precision(dtype: torch.dtype) -> str:
    # float32 operands: TF32 tensor cores would miss the float32 error bound (1e-5)
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one: keep its grids small
    return torch.cuda.get_device_properties(device).multi_processor_count
