"""Linear layers whose output is base matmul + a per-token LoRA from preallocated slot buffers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels.lora import LoraBatchMeta, lora_add


class LoraLinear(nn.Module):
    """One base matmul for one or several fused output slices (q|k|v, gate|up), plus batched LoRA.

    Slot buffers per slice: A `[max_loras, max_rank, in]`, B `[max_loras, out_slice, max_rank]`,
    scaling folded into B. An adapter of rank r fills the first r rows of A / columns of B and
    leaves the rest zero; `slot_ranks` in the batch meta tells the kernels where to stop.
    For the Triton kernels every buffer is contiguous. For the torch reference the A slices are
    views of one `[max_loras, slices, max_rank, in]` buffer (a slot's q|k|v or gate|up shrink is one
    matmul) and B is the transposed view of a contiguous B^T `[max_loras, max_rank, out_slice]`, so
    the expand streams whole rows of B^T (on the CPU twice as fast as B's rows of max_rank values).
    """

    def __init__(self, in_features: int, out_features: tuple[int, ...], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = tuple(out_features)
        total = sum(self.out_features)
        self.weight = nn.Parameter(torch.empty(total, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(total), requires_grad=False) if bias else None
        self.lora_a: list[torch.Tensor] = []
        self.lora_b: list[torch.Tensor] = []
        self.workspace_offset = 0  # first slice of this layer in the step's LoRA workspace (ModelRunner)

    def _offset(self, shard: int) -> int:
        return sum(self.out_features[:shard])

    def load_base(self, name: str, shard: int, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (`weight` or `bias` of one slice) into place."""
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {name} this layer does not have")
        expected = (self.out_features[shard], *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} of slice {shard}: shape {tuple(tensor.shape)}, expected {expected}")
        param.data.narrow(0, self._offset(shard), self.out_features[shard]).copy_(tensor)

    def create_lora_slots(self, max_loras: int, max_rank: int, backend: str = "triton") -> None:
        """Allocate zeroed slot buffers on the weight's device and dtype, laid out for `backend`'s LoRA ops."""
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        if backend == "reference":
            slices = len(self.out_features)
            a = torch.zeros(max_loras, slices, max_rank, self.in_features, **like)
            self.lora_a = [a[:, s] for s in range(slices)]  # [max_loras, max_rank, in] views
            bt = [torch.zeros(max_loras, max_rank, out, **like) for out in self.out_features]
            self.lora_b = [t.transpose(1, 2) for t in bt]  # [max_loras, out_slice, max_rank] views
        else:
            self.lora_a = [
                torch.zeros(max_loras, max_rank, self.in_features, **like) for _ in self.out_features
            ]
            self.lora_b = [torch.zeros(max_loras, out, max_rank, **like) for out in self.out_features]

    def set_lora(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Install A [r, in] and B [out_slice, r] (scaling already in B) in one slot, zero-padding the rank."""
        slot_a, slot_b = self.lora_a[shard][slot], self.lora_b[shard][slot]
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features[shard], rank):
            raise ValueError(
                f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                f"in={self.in_features}, out={self.out_features[shard]}"
            )
        if rank > slot_a.shape[0]:
            raise ValueError(f"LoRA rank {rank} exceeds the slot rank {slot_a.shape[0]}")
        slot_a.zero_()
        slot_b.zero_()
        slot_a[:rank].copy_(a)
        slot_b[:, :rank].copy_(b)

    def clear_lora(self, slot: int) -> None:
        for a, b in zip(self.lora_a, self.lora_b, strict=True):
            a[slot].zero_()
            b[slot].zero_()

    def forward(
        self,
        x: torch.Tensor,
        lora: LoraBatchMeta | None,
        backend: str | None = None,
        workspace: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, in] -> [T, sum(out_features)]; `backend` of the LoRA ops (None: chosen per call).

        `workspace`: the step's zeroed float32 LoRA workspace, `slices * T * max_rank` per layer from
        `workspace_offset` on (the shrink kernels add into it: no zero-fill launch per layer).
        """
        out = F.linear(x, self.weight, self.bias)
        if lora is not None and self.lora_a:
            y = None
            if workspace is not None:
                shape = (len(self.lora_a), x.shape[0], self.lora_a[0].shape[1])
                start = self.workspace_offset * shape[1] * shape[2]
                y = workspace[start : start + shape[0] * shape[1] * shape[2]].view(shape)
            lora_add(x, self.lora_a, self.lora_b, lora, out, backend=backend, y=y)
        return out
