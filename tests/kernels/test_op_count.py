"""The op counter: aten ops, Triton launches (interpreter) and blocking syncs, by name and scope."""

from __future__ import annotations

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from loraplex.kernels import fused
from loraplex.kernels.op_count import OpCounter


def test_three_aten_ops_and_one_triton_launch_count_four():
    x = torch.randn(4, 16)
    with OpCounter() as counter:
        y = (x + 1) * 2  # add, mul
        z = y.sum()  # sum
        fused.act_mul(y, "silu", "triton")  # one launch; the interpreter's own copies do not count
    assert counter.total.num_ops == 4
    assert counter.total.num_triton_launches == 1
    assert counter.total.ops["triton:_act_mul_kernel"] == 1
    assert counter.total.ops["aten.sum.default"] == 1
    assert counter.total.num_syncs == 0
    assert z.shape == ()


def test_views_and_allocations_count_nothing():
    x = torch.randn(4, 6)
    with OpCounter() as counter:
        x.view(6, 4), x.t(), x[1], x[:, 2:], x.split([2, 4], dim=1), x.chunk(2), x.unsqueeze(0)
        x.contiguous(), x.reshape(24), torch.empty(3), torch.empty_like(x), x.new_empty(5)
    assert counter.total.num_ops == 0, counter.total.ops
    assert counter.total.num_syncs == 0


def test_syncs_are_counted_apart_from_ops():
    x = torch.arange(6)
    with OpCounter() as counter:
        x[2].item()
        assert counter.total.syncs == {"item": 1} and counter.total.num_ops == 0
        int(x[0]), bool(x[1]), x.tolist()  # two more scalar reads, one list
        x[x > 2]  # gt is an op; the mask makes the host wait for the count
        x[torch.tensor([0, 2])]  # integer indexing is an op, no sync
        torch.equal(x, x)
    assert counter.total.syncs == {
        "item": 3,
        "tolist": 1,
        "aten.index.Tensor with a mask": 1,
        "aten.equal.default": 1,
    }
    assert counter.total.ops == {"aten.gt.Scalar": 1, "aten.index.Tensor": 1}


def test_scopes_count_what_runs_inside_them():
    x = torch.randn(3, 3)
    with OpCounter() as counter:
        x + x
        for _ in range(2):
            with counter.scope("layer"):
                x @ x
                with counter.scope("inner"):
                    x.exp()
    assert counter.total.num_ops == 5
    assert counter.scopes["layer"].ops == {"aten.mm.default": 2, "aten.exp.default": 2}
    assert counter.scopes["inner"].num_ops == 2


def test_device_filter_leaves_out_other_devices():
    x = torch.randn(3)
    with OpCounter(device_types={"cuda"}) as counter:
        (x + 1)[0].item()
        x.tolist()
    assert counter.total.num_ops == 0 and counter.total.num_syncs == 0


def test_hooks_are_removed_on_exit_and_counters_do_not_nest():
    run, tolist = InterpretedFunction.run, torch.Tensor.tolist
    with OpCounter() as counter:
        hooks = triton.knobs.runtime.launch_enter_hook.calls
        assert len(hooks) == 1
        hooks[0](_LaunchMetadata("_shrink_kernel"))  # what a compiled kernel's launch calls
        with pytest.raises(RuntimeError, match="another OpCounter"), OpCounter():
            pass
    assert counter.total.ops == {"triton:_shrink_kernel": 1}
    assert InterpretedFunction.run is run and torch.Tensor.tolist == tolist
    assert triton.knobs.runtime.launch_enter_hook.calls == []
    with OpCounter() as again:
        torch.ones(2).tolist()
    assert again.total.num_syncs == 1


class _LaunchMetadata:
    """The LazyDict Triton hands its launch hooks."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get(self) -> dict:
        return {"name": self.name}
