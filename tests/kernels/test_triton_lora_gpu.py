"""The Triton kernels on a real GPU: accuracy in fp32/fp16/bf16 at model shapes, and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import lora, reference
from loraplex.kernels.meta import LoraBatchMeta

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RANKS = (8, 0, 64, 16, 12, 32, 16, 8)
QKV = (2048, 1024, 1024)  # Gemma-2-2B q/k/v widths, hidden 2304


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
def test_kernels_match_float64_on_gpu(lora_checks, num_tokens, dtype):
    case = lora_checks.make_case(
        num_tokens, RANKS, QKV, in_features=2304, dtype=dtype, device="cuda", seed=num_tokens
    )
    assert lora.kernel_backend(case.x.device) == "triton"
    lora_checks.check_shrink(lora.lora_shrink, case)
    lora_checks.check_expand(lora.lora_expand, case, add=True)
    lora_checks.check_expand(lora.lora_expand, case, add=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_up_and_down_shapes(lora_checks, dtype):
    gate_up = lora_checks.make_case(32, RANKS, (9216, 9216), in_features=2304, dtype=dtype, device="cuda")
    lora_checks.check_shrink(lora.lora_shrink, gate_up)
    lora_checks.check_expand(lora.lora_expand, gate_up, add=True)
    down = lora_checks.make_case(32, RANKS, (2304,), in_features=9216, dtype=dtype, device="cuda", seed=1)
    lora_checks.check_shrink(lora.lora_shrink, down)
    lora_checks.check_expand(lora.lora_expand, down, add=True)


def test_one_captured_graph_serves_every_batch_composition(lora_checks):
    num_tokens, ranks = 32, torch.tensor(RANKS, dtype=torch.int32, device="cuda")
    case = lora_checks.make_case(
        num_tokens, RANKS, QKV, in_features=2304, dtype=torch.bfloat16, device="cuda"
    )
    meta = LoraBatchMeta.build(torch.full((num_tokens,), -1, device="cuda"), ranks)
    out = torch.zeros(num_tokens, sum(QKV), dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        y = lora.lora_shrink(case.x, case.a_slots, meta)
        lora.lora_expand(y, case.b_slots, meta, out, add=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(4):
        slots = torch.randint(-1, len(RANKS), (num_tokens,), device="cuda", generator=gen)
        fresh = LoraBatchMeta.build(slots, ranks)
        meta.copy_(fresh)
        out.zero_()
        graph.replay()
        expected = reference.lora_expand(
            reference.lora_shrink(case.x, case.a_slots, fresh),
            case.b_slots,
            fresh,
            torch.zeros_like(out),
        )
        assert lora_checks.rel_error(out.float(), expected.double().cpu()) < 2e-2
