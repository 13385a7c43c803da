"""LoraLinear: fused base matmul plus per-token LoRA from slot buffers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.lora import LoraBatchMeta
from loraplex.server.layers.linear import LoraLinear

IN, OUTS = 6, (5, 3, 3)


def _layer(bias: bool = True) -> LoraLinear:
    gen = torch.Generator().manual_seed(0)
    layer = LoraLinear(IN, OUTS, bias=bias)
    for shard, out in enumerate(OUTS):
        layer.load_base("weight", shard, torch.randn(out, IN, generator=gen))
        if bias:
            layer.load_base("bias", shard, torch.randn(out, generator=gen))
    layer.create_lora_slots(max_loras=3, max_rank=4)
    return layer


def test_base_only_is_the_plain_linear() -> None:
    layer = _layer()
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x, None), F.linear(x, layer.weight, layer.bias))


def test_per_token_lora_on_each_slice() -> None:
    layer = _layer()
    gen = torch.Generator().manual_seed(1)
    adapters = {}  # slot -> per slice (A, B)
    for slot, rank in ((0, 2), (2, 4)):
        adapters[slot] = [
            (torch.randn(rank, IN, generator=gen), torch.randn(out, rank, generator=gen)) for out in OUTS
        ]
        for shard, (a, b) in enumerate(adapters[slot]):
            layer.set_lora(slot, shard, a, b)
    token_slots = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)  # slot 1 is empty: base only
    meta = LoraBatchMeta.build(token_slots, torch.tensor([2, 0, 4], dtype=torch.int32))
    x = torch.randn(5, IN, generator=gen)
    out = layer(x, meta)
    base = F.linear(x, layer.weight, layer.bias)
    for t, slot in enumerate(token_slots.tolist()):
        want = base[t].clone()
        if slot in adapters:
            want += torch.cat([b @ (a @ x[t]) for a, b in adapters[slot]])
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=0)


def test_set_and_clear_lora_zero_pad_the_slot() -> None:
    layer = _layer(bias=False)
    layer.set_lora(1, 2, torch.ones(4, IN), torch.ones(OUTS[2], 4))
    layer.set_lora(1, 2, torch.full((2, IN), 2.0), torch.full((OUTS[2], 2), 3.0))
    assert layer.lora_a[2][1, 2:].abs().sum() == 0  # rows of the previous, larger adapter are gone
    assert layer.lora_b[2][1, :, 2:].abs().sum() == 0
    layer.clear_lora(1)
    assert all(t[1].abs().sum() == 0 for t in layer.lora_a + layer.lora_b)


def test_shape_checks() -> None:
    layer = _layer()
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_lora(0, 0, torch.ones(2, IN + 1), torch.ones(OUTS[0], 2))
    with pytest.raises(ValueError, match="exceeds the slot rank 4"):
        layer.set_lora(0, 0, torch.ones(8, IN), torch.ones(OUTS[0], 8))
    with pytest.raises(ValueError, match=r"shape \(4, 6\), expected \(3, 6\)"):
        layer.load_base("weight", 1, torch.ones(4, IN))
    with pytest.raises(ValueError, match="does not have"):
        _layer(bias=False).load_base("bias", 0, torch.ones(OUTS[0]))
