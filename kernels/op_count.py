"""Count what a piece of code would launch on a GPU, and where it would wait for one, on any device.

    with OpCounter() as counter:
        with counter.scope("layer"):
            model_layer(...)
    counter.total.num_ops, counter.scopes["layer"].ops, counter.total.syncs

Counted as device ops (`OpCounts.ops`, by name):
- every aten op the code dispatches (a `TorchDispatchMode`), except views and ops that only
  allocate or touch metadata (`NO_LAUNCH`, and every overload with `is_view`): on a GPU each
  counted op is at least one kernel launch or copy (a few, such as SDPA or argsort, are more).
- every Triton kernel launch: the `launch_enter_hook` of compiled kernels and, under the
  interpreter, `InterpretedFunction.run`. The aten ops the interpreter itself issues to move
  arguments to and from the host are not counted.

Counted as blocking syncs (`OpCounts.syncs`), not as ops: `.item()`/`int()`/`float()`/`bool()`
(`aten._local_scalar_dense`), ops whose result depends on the data (`Tag.data_dependent_output`,
e.g. `torch.equal`) or whose output shape does (`Tag.dynamic_output_shape`: `nonzero`, indexing
with a boolean mask, `unique`...; integer indexing is an op), `.tolist()`, and device-to-host copies.

`device_types` limits counting to ops that touch tensors of those device types (on a GPU run,
`{"cuda"}` leaves out host-side torch work). On a CPU run every tensor is a CPU tensor: host-side
torch ops count as device ops there, and a host-to-device `.to(device)` is a no-op that does not
show (an explicit `copy_` into a buffer does). One counter at a time, one thread.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# Overload packets that allocate or rewrite metadata only: no kernel runs for them.
NO_LAUNCH = frozenset(
    {
        aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
        aten.detach, aten.alias, aten.lift_fresh, aten.set_, aten.resize_, aten._reshape_alias,
        aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.is_same_size,
        aten.record_stream,
    }
)  # fmt: skip
_SCALAR_READ = aten._local_scalar_dense.default
_COPIES = frozenset({aten._to_copy, aten.copy_})
_INDEXING = frozenset({aten.index, aten.index_put, aten.index_put_, aten._unsafe_index_put})
_active = threading.Lock()


@dataclass
class OpCounts:
    """Device ops and blocking syncs, each by name (`aten.mm.default`, `triton:_rope_kv_kernel`)."""

    ops: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def num_triton_launches(self) -> int:
        return sum(n for name, n in self.ops.items() if name.startswith("triton:"))


class OpCounter:
    """Context manager that counts into `total` and into every open `scope(name)`."""

    def __init__(self, device_types: frozenset[str] | set[str] | None = None) -> None:
        self.device_types = None if device_types is None else frozenset(device_types)
        self.total = OpCounts()
        self.scopes: dict[str, OpCounts] = {}
        self._open: list[OpCounts] = []
        self._interpreting = 0
        self._mode = _DispatchCounter(self)
        self._restore: list = []

    def __enter__(self) -> OpCounter:
        if not _active.acquire(blocking=False):
            raise RuntimeError("another OpCounter is active")
        self._install_triton_hooks()
        self._patch_tolist()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        _active.release()

    @contextmanager
    def scope(self, name: str) -> Iterator[OpCounts]:
        """Also count what runs inside into `scopes[name]` (re-entered scopes accumulate)."""
        counts = self.scopes.setdefault(name, OpCounts())
        self._open.append(counts)
        try:
            yield counts
        finally:
            self._open.remove(counts)

    def record_op(self, name: str) -> None:
        for counts in (self.total, *self._open):
            counts.ops[name] += 1

    def record_sync(self, name: str) -> None:
        for counts in (self.total, *self._open):
            counts.syncs[name] += 1

    def counts_tensors(self, tensors: list[torch.Tensor]) -> bool:
        if self.device_types is None:
            return True
        return any(t.device.type in self.device_types for t in tensors)

    def _install_triton_hooks(self) -> None:
        try:
            import triton
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # no Triton: nothing launches through it
            return

        def on_launch(metadata) -> None:
            self.record_op(f"triton:{metadata.get()['name']}")

        hooks = triton.knobs.runtime.launch_enter_hook
        hooks.add(on_launch)
        self._restore.append(lambda: hooks.remove(on_launch))
        run = InterpretedFunction.run

        def interpreted_run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            self.record_op(f"triton:{fn.__name__}")
            self._interpreting += 1  # its argument copies are the interpreter's, not the kernel's
            try:
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                self._interpreting -= 1

        InterpretedFunction.run = interpreted_run
        self._restore.append(lambda: setattr(InterpretedFunction, "run", run))

    def _patch_tolist(self) -> None:
        tolist = torch.Tensor.tolist  # a C method, not dispatched: wrap it while counting

        def counted_tolist(tensor: torch.Tensor):
            if not self._interpreting and self.counts_tensors([tensor]):
                self.record_sync("tolist")
            return tolist(tensor)

        own = torch.Tensor.__dict__.get("tolist")  # None: inherited from the C base class
        torch.Tensor.tolist = counted_tolist
        self._restore.append(
            lambda: delattr(torch.Tensor, "tolist") if own is None else setattr(torch.Tensor, "tolist", own)
        )


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if not counter._interpreting and _is_composite(func):
            # Under inference_mode composite ops (linear, type_as, ...) arrive whole: count what
            # they are made of (type_as to the same dtype is nothing, linear one matmul).
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if counter._interpreting or func.is_view or func.overloadpacket in NO_LAUNCH:
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not counter.counts_tensors(tensors):
            return out
        kind = _sync_kind(func, args, kwargs, out)
        if kind is None:
            counter.record_op(str(func))
        else:
            counter.record_sync(kind)
        return out


@functools.cache
def _is_composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _sync_kind(func, args, kwargs, out) -> str | None:
    """Why `func` makes the host wait for the device, or None when it does not."""
    if func is _SCALAR_READ:
        return "item"
    if func.overloadpacket in _INDEXING:  # a boolean mask becomes indices on the host
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        masks = [i for i in indices if i is not None and i.dtype in (torch.bool, torch.uint8)]
        return f"{func} with a mask" if masks else None
    if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
        return str(func)
    if func.overloadpacket in _COPIES:
        src = args[1] if func.overloadpacket is aten.copy_ else args[0]
        dst = args[0] if func.overloadpacket is aten.copy_ else out
        if src.device.type != "cpu" and dst.device.type == "cpu":
            return "device-to-host copy"
    return None
