"""Random mixed-adapter LoRA batches and a float64 oracle written independently of the kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from loraplex.kernels.meta import LoraBatchMeta

# Relative error bounds against float64 (issue 3): fp32 1e-5, half precision 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass
class LoraCase:
    """One batch: tokens on random slots (some -1), adapters of mixed rank, poisoned padding."""

    x: torch.Tensor  # [T, in]
    a_slots: list[torch.Tensor]  # [S, R, in] per slice
    b_slots: list[torch.Tensor]  # [S, out_s, R] per slice
    token_slots: torch.Tensor  # int32 [T]
    slot_ranks: torch.Tensor  # int32 [S]

    @property
    def meta(self) -> LoraBatchMeta:
        return LoraBatchMeta.build(self.token_slots, self.slot_ranks)

    def token_rank(self, t: int) -> int:
        slot = int(self.token_slots[t])
        return 0 if slot < 0 else int(self.slot_ranks[slot])

    def expected_y(self) -> torch.Tensor:
        """float64 [slices, T, R]; zero where the contract leaves y unspecified."""
        y = torch.zeros(len(self.a_slots), self.x.shape[0], self.a_slots[0].shape[1], dtype=torch.float64)
        for t in range(self.x.shape[0]):
            slot, rank = int(self.token_slots[t]), self.token_rank(t)
            for s, a in enumerate(self.a_slots):
                if rank:
                    y[s, t, :rank] = a[slot, :rank].double().cpu() @ self.x[t].double().cpu()
        return y

    def expected_delta(self, y: torch.Tensor) -> torch.Tensor:
        """float64 [T, sum(out_s)]: what expand adds for y (zero rows for tokens without an adapter)."""
        width = sum(b.shape[1] for b in self.b_slots)
        delta = torch.zeros(self.x.shape[0], width, dtype=torch.float64)
        for t in range(self.x.shape[0]):
            slot, rank, offset = int(self.token_slots[t]), self.token_rank(t), 0
            for s, b in enumerate(self.b_slots):
                if rank:
                    cols = b[slot, :, :rank].double().cpu() @ y[s, t, :rank].double().cpu()
                    delta[t, offset : offset + b.shape[1]] = cols
                offset += b.shape[1]
        return delta

    def has_adapter(self) -> torch.Tensor:
        return torch.tensor([self.token_rank(t) > 0 for t in range(self.x.shape[0])])


def make_case(
    num_tokens: int,
    slot_ranks: Sequence[int],
    widths: Sequence[int],
    in_features: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    token_slots: Sequence[int] | None = None,
) -> LoraCase:
    """Random inputs; slot buffers beyond each adapter's rank (and empty slots) hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, max_rank = len(slot_ranks), max(max(slot_ranks), 1)
    if token_slots is None:
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    else:
        slots = torch.tensor(token_slots, dtype=torch.int64)
    x = torch.randn(num_tokens, in_features, generator=gen)
    a_slots = [
        torch.randn(num_slots, max_rank, in_features, generator=gen) / in_features**0.5 for _ in widths
    ]
    b_slots = [torch.randn(num_slots, w, max_rank, generator=gen) / max_rank**0.5 for w in widths]
    for slot, rank in enumerate(slot_ranks):
        for a, b in zip(a_slots, b_slots, strict=True):
            a[slot, rank:] = float("nan")
            b[slot, :, rank:] = float("nan")
    return LoraCase(
        x=x.to(device=device, dtype=dtype),
        a_slots=[a.to(device=device, dtype=dtype) for a in a_slots],
        b_slots=[b.to(device=device, dtype=dtype) for b in b_slots],
        token_slots=slots.to(device=device, dtype=torch.int32),
        slot_ranks=torch.tensor(list(slot_ranks), dtype=torch.int32, device=device),
    )


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||; inf when got holds NaN or inf (NaN never passes)."""
    got64 = got.double().cpu()
    if not bool(torch.isfinite(got64).all()):
        return float("inf")
    scale = float(expected.norm()) or 1.0
    return float((got64 - expected).norm()) / scale


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that treats identical NaN payloads as equal."""
    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.cpu().view(view), b.cpu().view(view))


ShrinkFn = Callable[[torch.Tensor, list[torch.Tensor], LoraBatchMeta], torch.Tensor]
ExpandFn = Callable[..., torch.Tensor]


def check_shrink(shrink: ShrinkFn, case: LoraCase) -> torch.Tensor:
    """Run `shrink` and compare the specified part of y with float64; returns y."""
    y = shrink(case.x, case.a_slots, case.meta)
    assert y.shape == (len(case.a_slots), case.x.shape[0], case.a_slots[0].shape[1])
    assert y.dtype == torch.float32
    expected = case.expected_y()
    specified = torch.zeros_like(expected, dtype=torch.bool)
    for t in range(case.x.shape[0]):
        specified[:, t, : case.token_rank(t)] = True
    got = torch.where(specified, y.double().cpu(), 0.0)
    assert rel_error(got, expected) < TOLERANCE[case.x.dtype]
    return y


def check_expand(expand: ExpandFn, case: LoraCase, add: bool, seed: int = 1) -> None:
    """Expand a float32 y from the oracle into a poisoned out; compare with float64."""
    y64 = case.expected_y()
    y = (y64 + torch.where(y64 == 0, float("nan"), 0.0)).float().to(case.x.device)  # unspecified = NaN
    width = sum(b.shape[1] for b in case.b_slots)
    gen = torch.Generator().manual_seed(seed)
    if add:
        start = torch.randn(case.x.shape[0], width, generator=gen)
        start[~case.has_adapter()] = float("nan")  # rows without an adapter must stay as they are
    else:
        start = torch.full((case.x.shape[0], width), float("nan"))  # every element must be written
    out = start.to(device=case.x.device, dtype=case.b_slots[0].dtype)
    before = out.clone()
    returned = expand(y, case.b_slots, case.meta, out, add=add)
    assert returned is out
    rows = case.has_adapter()
    expected = case.expected_delta(y64) + (before.double().cpu() if add else 0.0)
    assert rel_error(out[rows.to(out.device)], expected[rows]) < TOLERANCE[out.dtype]
    untouched = out[~rows.to(out.device)]
    if add:
        assert same_bits(untouched, before[~rows.to(out.device)])
    else:
        assert bool((untouched == 0).all())


@dataclass(frozen=True)
class LoraChecks:
    """What the kernel test modules share (a fixture, so no test imports a conftest)."""

    make_case: Callable[..., LoraCase] = make_case
    check_shrink: Callable[[ShrinkFn, LoraCase], torch.Tensor] = check_shrink
    check_expand: Callable[..., None] = check_expand
    rel_error: Callable[[torch.Tensor, torch.Tensor], float] = rel_error


@pytest.fixture
def lora_checks() -> LoraChecks:
    return LoraChecks()
