"""What a user gets without loraplex: transformers `generate` (base) and PEFT with mixed adapters.

Same checkpoint and shapes as the engine benchmark. PEFT mixes adapters in one batch the way
its docs show: every adapter loaded into one `PeftModel` by name, and `generate(...,
adapter_names=[...])` with one name per row ("__base__" = no adapter). Greedy, fixed output
length (`min_new_tokens == max_new_tokens`), timed over the whole `generate` call after a
short warm-up; `ms_per_step` = wall time / new tokens, as DESIGN §9 quotes them.

    python bench/baselines.py --checkpoint /tmp/loraplex-bench/gemma-2-2b --adapters 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class BaselineResult:
    name: str  # "transformers" or "peft"
    batch: int
    distinct_adapters: int
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def ms_per_step(self) -> float:
        return self.seconds / self.new_tokens * 1e3

    @property
    def tok_s(self) -> float:
        return self.batch * self.new_tokens / self.seconds

    def row(self) -> dict:
        return asdict(self) | {"ms_per_step": round(self.ms_per_step, 2), "tok_s": round(self.tok_s, 1)}


def load_base(checkpoint: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device)
    return model.eval()


def load_peft(base, adapter_dirs: list[Path]):
    """One PeftModel holding every adapter under its own name (a0, a1, ...)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model.eval()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def time_generate(model, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate of exactly `new_tokens` tokens per row; the output ids."""
    device = str(input_ids.device)
    args = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )
    _synchronize(device)
    start = time.perf_counter()
    out = model.generate(**args)
    _synchronize(device)
    return time.perf_counter() - start, out


def measure(
    name: str, model, input_ids: torch.Tensor, new_tokens: int, adapter_names: list[str] | None = None
) -> BaselineResult:
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    time_generate(model, input_ids, min(4, new_tokens), **kwargs)  # warm-up: kernels, allocator
    seconds, out = time_generate(model, input_ids, new_tokens, **kwargs)
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"{name}: generated {out.shape[1] - input_ids.shape[1]} tokens, not {new_tokens}")
    distinct = len(set(adapter_names or ()) - {"__base__"})
    return BaselineResult(name, input_ids.shape[0], distinct, input_ids.shape[1], new_tokens, seconds)


def run_baselines(
    checkpoint: Path,
    adapter_dirs: list[Path],
    batch: int,
    prompt_tokens: int,
    new_tokens: dict[str, int],
    device: str,
    dtype: torch.dtype = torch.bfloat16,
) -> list[BaselineResult]:
    """transformers base, then PEFT with row i on adapter i % len(adapter_dirs)."""
    base = load_base(checkpoint, device, dtype)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, base.config.vocab_size, (batch, prompt_tokens), generator=gen).to(device)
    results = [measure("transformers", base, input_ids, new_tokens["transformers"])]
    if adapter_dirs:
        model = load_peft(base, adapter_dirs)
        names = [f"a{i % len(adapter_dirs)}" for i in range(batch)]
        results.append(measure("peft", model, input_ids, new_tokens["peft"], adapter_names=names))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="from bench/random_checkpoint.py")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters in the PEFT batch")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--base-new-tokens", type=int, default=128)
    p.add_argument("--peft-new-tokens", type=int, default=32, help="PEFT is ~1 s/step on H100: keep it short")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    dirs = [args.checkpoint / "adapters" / f"a{i}" for i in range(args.adapters)]
    results = run_baselines(
        args.checkpoint,
        dirs,
        args.batch,
        args.prompt_tokens,
        {"transformers": args.base_new_tokens, "peft": args.peft_new_tokens},
        args.device,
    )
    text = json.dumps([r.row() for r in results], indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
