"""Which implementation the kernel ops run: chosen once by the caller, passed down as a plain value.

`choose_backend(device)` reads the environment when it is called (the model runner calls it
once, in its constructor); the ops themselves take `backend` as an argument and never read
the environment. Backends:

- "triton": the Triton kernels; on CPU tensors they run in Triton's interpreter (tests).
- "reference": the torch ops (the CPU path and the kernels' oracle).

`LORAPLEX_KERNELS=triton|reference` forces one; `auto` (the default) picks "triton" for CUDA
devices, and for CPU devices when `TRITON_INTERPRET=1`, "reference" otherwise.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "LORAPLEX_KERNELS"
BACKENDS = ("triton", "reference")
_CHOICES = ("auto", *BACKENDS)


def choose_backend(device: torch.device | str) -> str:
    """'triton' or 'reference' for tensors on `device`, honouring LORAPLEX_KERNELS and TRITON_INTERPRET."""
    forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if forced not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {_CHOICES}")
    if forced != "auto":
        return forced
    if torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def check_backend(backend: str) -> str:
    """`backend` itself, or ValueError when it names no backend (a typo must not pick one silently)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    return backend
