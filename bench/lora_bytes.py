"""What reading the adapters' weights alone costs per decode step in bench/cpu.py's `mixed` job.

With every request of the batch on its own adapter, each decode step must read every active
adapter's A and B once per layer and projection. This prints that byte count for the
SmolLM-135M layout (bench/configs/smollm-135m-config.json), the time of the bare batched
shrink + expand matmuls over distinct weights per layer (nothing else of the engine), and one
thread's read bandwidth over the same bytes, so the `mixed / base` ratio of bench/cpu.py can be
read against its floor: base step time / (base step time + this time).

    python bench/lora_bytes.py            # one torch thread, as bench/cpu.py runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent / "configs" / "smollm-135m-config.json"


def projection_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of the 7 LoRA targets of one layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return [
        (hidden, q),
        (hidden, kv),
        (hidden, kv),
        (q, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def timed(fn, repeats: int) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(CONFIG.read_text())
    shapes, layers, n, r = projection_shapes(config), config["num_hidden_layers"], args.adapters, args.rank
    a = [
        [torch.randn(n, r, i) for i, _ in shapes] for _ in range(layers)
    ]  # distinct per layer: no cache reuse
    b = [[torch.randn(n, r, o) for _, o in shapes] for _ in range(layers)]
    xs = [torch.randn(n, 1, i) for i, _ in shapes]  # one decode token per adapter

    def lora_step() -> None:
        for layer_a, layer_b in zip(a, b, strict=True):
            for wa, wb, x in zip(layer_a, layer_b, xs, strict=True):
                torch.bmm(torch.bmm(x, wa.transpose(1, 2)), wb)

    nbytes = sum(t.numel() * t.element_size() for layer in a + b for t in layer)
    flat = torch.randn(nbytes // 4)
    matmuls, read = timed(lora_step, args.repeats), timed(flat.sum, args.repeats)
    print(
        json.dumps(
            {
                "adapters": n,
                "rank": r,
                "layers": layers,
                "threads": args.threads,
                "lora_mb_per_step": round(nbytes / 1e6, 1),
                "bare_bmm_ms_per_step": round(matmuls * 1e3, 2),
                "bare_bmm_gb_s": round(nbytes / matmuls / 1e9, 1),
                "read_ms_same_bytes": round(read * 1e3, 2),
                "read_gb_s": round(nbytes / read / 1e9, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
