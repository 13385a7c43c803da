"""Triton paged attention against a float64 oracle, and through the engine's model runner.

On CPU tensors the kernels run in Triton's interpreter (fp32 and fp16; the interpreter's
`tl.dot` is wrong for bf16, so bf16 runs only in the `gpu` tests). Caches are poisoned with
NaN wherever no query may look (slots of no sequence, positions past a context's end or
before every query's sliding window), so a kernel that reads them fails.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplex.kernels import paged_attention as pa
from loraplex.kernels.paged_attention import AttentionSpec, DecodeConfig, PrefillConfig
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.layers.attention import ATTENTION_ENV, attention_backend
from loraplex.server.layers.metadata import build_forward_metadata
from loraplex.server.model_runner import ModelRunner, RunnerConfig

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
KV_HEADS = 2


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, heads, D]
    key_cache: torch.Tensor  # [blocks, block_size, kv_heads, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B]
    query_starts: torch.Tensor  # int32 [B + 1]
    spec: AttentionSpec

    @property
    def kv_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache, self.value_cache

    def expected(self) -> torch.Tensor:
        """float64 [T, heads, D]: softmax(softcap(q k^T * scale) + causal/window mask) v, per sequence."""
        out = torch.zeros(self.q.shape, dtype=torch.float64)
        heads_per_kv = self.q.shape[1] // self.key_cache.shape[2]
        block_size = self.key_cache.shape[1]
        for b, n in enumerate(self.context_lens.tolist()):
            first, end = self.query_starts[b].item(), self.query_starts[b + 1].item()
            if end == first:
                continue
            pos = torch.arange(n)
            blocks = self.block_tables[b].long()[pos // block_size]
            keys = self.key_cache[blocks, pos % block_size].double()  # [n, kv_heads, D]
            # keys before every query's window are NaN (poison); zero them so 0 * NaN stays out of the sums
            keys = keys.nan_to_num(0.0)
            values = self.value_cache[blocks, pos % block_size].double().nan_to_num(0.0)
            q_pos = torch.arange(n - (end - first), n)
            seen = pos[None, :] <= q_pos[:, None]
            if self.spec.sliding_window is not None:
                seen &= pos[None, :] > q_pos[:, None] - self.spec.sliding_window
            for h in range(self.q.shape[1]):
                scores = self.q[first:end, h].double() @ keys[:, h // heads_per_kv].T * self.spec.scale
                if self.spec.softcap is not None:
                    scores = torch.tanh(scores / self.spec.softcap) * self.spec.softcap
                probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
                out[first:end, h] = probs @ values[:, h // heads_per_kv]
        return out


def make_case(
    cached: list[int],
    new: list[int],
    heads_per_kv: int,
    head_dim: int,
    block_size: int,
    spec: AttentionSpec,
    dtype: torch.dtype,
    seed: int = 0,
    kv_heads: int = KV_HEADS,
) -> PagedCase:
    """Sequence b has cached[b] + new[b] positions in shuffled blocks; everything no query sees is NaN."""
    gen = torch.Generator().manual_seed(seed)
    contexts = [c + n for c, n in zip(cached, new, strict=True)]
    counts = [-(-n // block_size) for n in contexts]
    num_blocks = sum(counts) + 3  # a few blocks no sequence owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    block_tables = torch.zeros(len(contexts), max(counts, default=0) + 2, dtype=torch.int32)
    for b, (n, count, c) in enumerate(zip(contexts, counts, cached, strict=True)):
        table, order = order[:count], order[count:]
        block_tables[b, :count] = torch.tensor(table, dtype=torch.int32)
        first_seen = 0 if spec.sliding_window is None else max(0, c - spec.sliding_window + 1)
        pos = torch.arange(first_seen, n)
        blocks = torch.tensor(table, dtype=torch.long)[pos // block_size]
        for cache in (key_cache, value_cache):
            cache[blocks, pos % block_size] = torch.randn(len(pos), kv_heads, head_dim, generator=gen)
    heads = kv_heads * heads_per_kv
    q = 2 * torch.randn(sum(new), heads, head_dim, generator=gen)  # large enough that softcap matters
    starts = torch.tensor([0, *new]).cumsum(0).to(torch.int32)
    return PagedCase(
        q=q.to(dtype),
        key_cache=key_cache.to(dtype),
        value_cache=value_cache.to(dtype),
        block_tables=block_tables,
        context_lens=torch.tensor(contexts, dtype=torch.int32),
        query_starts=starts,
        spec=spec,
    )


def to_device(case: PagedCase, device: str) -> PagedCase:
    return PagedCase(
        **{
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in vars(case).items()
        }
    )


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got64 = got.double().cpu()
    if not bool(torch.isfinite(got64).all()):
        return float("inf")
    return float((got64 - expected).norm() / expected.norm())


def _spec(head_dim: int, softcap: float | None, window: int | None) -> AttentionSpec:
    return AttentionSpec(scale=head_dim**-0.5, softcap=softcap, sliding_window=window)


# (dtype, heads per KV head, head_dim, block_size, softcap, sliding window): every GQA ratio, head_dim,
# softcap and window setting meets both dtypes; windows are shorter and longer than the contexts.
CASES = [
    (torch.float32, 1, 16, 4, None, None),
    (torch.float32, 2, 64, 4, 2.0, None),
    (torch.float32, 4, 16, 16, None, 6),
    (torch.float32, 2, 16, 4, 2.0, 1000),
    (torch.float32, 4, 64, 4, 2.0, 6),
    (torch.float32, 1, 64, 16, None, 1000),
    (torch.float16, 1, 64, 4, 2.0, 6),
    (torch.float16, 2, 16, 16, None, None),
    (torch.float16, 4, 64, 4, None, 1000),
    (torch.float16, 2, 64, 4, 2.0, 6),
    (torch.float16, 4, 16, 4, 2.0, None),
    (torch.float16, 1, 16, 16, None, 6),
]


def _case_id(case) -> str:
    dtype, g, d, bs, cap, w = case
    return f"{str(dtype)[6:]}-gqa{g}-d{d}-bs{bs}-cap{cap}-win{w}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_matches_float64(case) -> None:
    dtype, heads_per_kv, head_dim, block_size, softcap, window = case
    contexts = [1, 4, 7, 16, 33, 50]  # lengths on and off block edges
    spec = _spec(head_dim, softcap, window)
    paged = make_case(
        [n - 1 for n in contexts], [1] * len(contexts), heads_per_kv, head_dim, block_size, spec, dtype
    )
    expected = paged.expected()
    # A padded batch, as under a CUDA graph: one more row with context length 0.
    q = torch.cat([paged.q, paged.q[:1]])
    block_tables = torch.cat([paged.block_tables, torch.zeros_like(paged.block_tables[:1])])
    context_lens = torch.cat([paged.context_lens, torch.zeros(1, dtype=torch.int32)])
    # Default tiles (one partition) and tiny partitions (split-K and a merge) must agree with the oracle.
    for config in (None, DecodeConfig(block_n=16, partition=32)):
        out = torch.full_like(q, float("nan"))
        pa.paged_decode_attention(q, paged.kv_cache, block_tables, context_lens, spec, out=out, config=config)
        assert rel_error(out[:-1], expected) < TOLERANCE[dtype], config
        assert bool(out[-1].isnan().all()), "an idle row must be left alone"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prefill_matches_float64(case) -> None:
    dtype, heads_per_kv, head_dim, block_size, softcap, window = case
    # fresh prompts, chunks after a cached prefix, one-token chunks, a chunk longer than a query tile
    cached, new = [0, 0, 5, 3, 12, 0], [1, 9, 1, 17, 6, 21]
    paged = make_case(
        cached, new, heads_per_kv, head_dim, block_size, _spec(head_dim, softcap, window), dtype
    )
    # small tiles: several query tiles per sequence and key tiles across block edges; default tiles in fp32
    configs = [PrefillConfig(block_m=16, block_n=16)] + ([None] if dtype == torch.float32 else [])
    for config in configs:
        out = torch.full_like(paged.q, float("nan"))
        pa.paged_prefill_attention(
            paged.q, paged.kv_cache, paged.block_tables, paged.context_lens,
            paged.query_starts, max(new), paged.spec, out=out, config=config,
        )  # fmt: skip
        assert rel_error(out, paged.expected()) < TOLERANCE[dtype], config


@pytest.mark.parametrize("window", [1, 7, 33])
def test_window_edges(window: int) -> None:
    """A window of one (each query sees only itself) and windows equal to a context or a chunk's length."""
    spec = _spec(16, None, window)
    decode = make_case([0, 6, 32], [1, 1, 1], 2, 16, 4, spec, torch.float32)
    out = pa.paged_decode_attention(decode.q, decode.kv_cache, decode.block_tables, decode.context_lens, spec)
    assert rel_error(out, decode.expected()) < TOLERANCE[torch.float32]
    prefill = make_case([0, 2, 26], [7, 33, 7], 2, 16, 4, spec, torch.float32)
    out = pa.paged_prefill_attention(
        prefill.q, prefill.kv_cache, prefill.block_tables, prefill.context_lens, prefill.query_starts, 33, spec,
        config=PrefillConfig(block_m=16, block_n=16),
    )  # fmt: skip
    assert rel_error(out, prefill.expected()) < TOLERANCE[torch.float32]


def test_softcap_and_window_change_the_result() -> None:
    """Guards the tests above against settings that happen to do nothing at these shapes."""
    plain = make_case([40], [1], 2, 16, 4, _spec(16, None, None), torch.float32).expected()
    capped = make_case([40], [1], 2, 16, 4, _spec(16, 2.0, None), torch.float32).expected()
    windowed = make_case([40], [1], 2, 16, 4, _spec(16, None, 6), torch.float32).expected()
    assert rel_error(capped, plain) > 0.05
    assert rel_error(windowed, plain) > 0.05


def test_launchers_check_layouts() -> None:
    paged = make_case([3], [1], 2, 16, 4, _spec(16, None, None), torch.float32)
    with pytest.raises(AssertionError, match="int32"):
        pa.paged_decode_attention(
            paged.q, paged.kv_cache, paged.block_tables.long(), paged.context_lens, paged.spec
        )
    with pytest.raises(AssertionError, match="GPU only"):
        half = tuple(c.bfloat16() for c in paged.kv_cache)
        pa.paged_decode_attention(
            paged.q.bfloat16(), half, paged.block_tables, paged.context_lens, paged.spec
        )
    with pytest.raises(AssertionError, match="dtype"):
        pa.paged_decode_attention(
            paged.q.half(), paged.kv_cache, paged.block_tables, paged.context_lens, paged.spec
        )


def test_decode_splits_long_contexts_only_when_the_grid_is_small() -> None:
    """Split-K fills the device when few (sequence, KV head) programs exist; a full batch is not split.
    (The CPU stands for a 4-SM device: the interpreter's grids stay small.)"""
    cpu = torch.device("cpu")
    one = pa.decode_config(num_seqs=1, num_kv_heads=4, head_dim=256, max_context=4096, device=cpu)
    full = pa.decode_config(num_seqs=64, num_kv_heads=4, head_dim=256, max_context=4096, device=cpu)
    short = pa.decode_config(num_seqs=1, num_kv_heads=4, head_dim=256, max_context=64, device=cpu)
    assert triton.cdiv(4096, one.partition) == 2  # 4 KV heads x 2 splits = twice the 4 "SMs"
    assert triton.cdiv(4096, full.partition) == 1
    assert triton.cdiv(64, short.partition) == 1  # partitions never get shorter than a few tiles
    for config in (one, full, short):
        assert config.partition % config.block_n == 0


def test_metadata_carries_block_tables_and_query_starts() -> None:
    prefill = SequenceChunk(0, (1, 2, 3), 5, (7, 2, 9), None)  # the table may run past the context
    decode = SequenceChunk(1, (9,), 2, (4,), None)
    fresh = SequenceChunk(2, (4, 4), 0, (1,), None)
    meta = build_forward_metadata(
        ForwardBatch((prefill, decode, fresh)),
        4,
        (None,),
        torch.zeros(1, dtype=torch.int32),
        torch.device("cpu"),
    )
    decodes, prefills = meta.attention_groups
    assert decodes.block_tables.tolist() == [[4]] and decodes.context_lens.tolist() == [3]
    assert decodes.query_starts.tolist() == [0, 1]
    assert prefills.block_tables.tolist() == [[7, 2], [1, 0]]
    assert prefills.context_lens.tolist() == [8, 2]
    assert prefills.query_starts.tolist() == [0, 3, 5]
    assert (
        prefills.block_tables.dtype
        == prefills.context_lens.dtype
        == prefills.query_starts.dtype
        == torch.int32
    )


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    assert attention_backend(torch.device("cpu")) == "torch"
    assert attention_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv(ATTENTION_ENV, "triton")
    assert attention_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv(ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match=ATTENTION_ENV):
        attention_backend(torch.device("cpu"))


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_gemma2_runner_logits_match_torch_attention(
    tiny_assets, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny Gemma2 (softcap, sliding window 8 on alternate layers, GQA) through the model runner
    in float32: the same logits with the Triton kernels (on CPU: the interpreter) as with the torch
    path, over steps that mix decodes with prefills of fresh prompts and of a chunk after a cached
    prefix, then decode only."""
    config = RunnerConfig(
        model_path=str(tiny_assets.models["gemma2"]),
        dtype="float32",
        device=device,
        block_size=4,
        num_kv_blocks=48,
    )
    runner = ModelRunner(config)
    blocks = list(range(runner.num_kv_blocks))
    random.Random(0).shuffle(blocks)
    tables = [tuple(blocks[i * 8 : (i + 1) * 8]) for i in range(4)]  # 32 positions each, shuffled
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, runner.vocab_size, (4, 24), generator=gen).tolist()
    # (sequence, cached, new) per step; sequence 1's prompt is prefilled over two steps
    plan = [
        [(0, 0, 11), (1, 0, 6), (3, 0, 9)],
        [(0, 11, 1), (1, 6, 7), (2, 0, 3), (3, 9, 1)],
        [(0, 12, 1), (1, 13, 1), (2, 3, 1), (3, 10, 1)],
    ]

    def run(backend: str) -> list[torch.Tensor]:
        monkeypatch.setenv(ATTENTION_ENV, backend)
        logits = []
        for step in plan:
            chunks = tuple(
                SequenceChunk(s, tuple(tokens[s][c : c + n]), c, tables[s], None) for s, c, n in step
            )
            logits.append(runner.execute(ForwardBatch(chunks)))
        return logits

    expected = run("torch")
    for got, want in zip(run("triton"), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


VECTOR_LOAD = r"ld\.global\S*\.v4|cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x10"


def _compile(fn, arch: int, constexprs: dict, float_ptrs: dict[str, str]):
    kernel = pa._kernel(fn, False)
    signature, aligned = {}, {}
    for i, param in enumerate(kernel.params):
        if param.name in constexprs:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = float_ptrs.get(param.name, "*i32")
        else:
            signature[param.name] = "fp32" if param.name in ("scale", "softcap") else "i32"
        if signature[param.name] not in ("constexpr", "fp32") and param.name not in pa._NO_SPECIALIZE[fn]:
            aligned[(i,)] = [["tt.divisibility", 16]]  # what the launcher sees for real model shapes
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (80, "fp16")])
def test_kernels_compile_for_gpu(arch: int, dtype: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path builds without a GPU at Gemma-2-2B's head_dim 256, and streams K/V as 16-byte vectors."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
    elem, precision = f"*{dtype}", "ieee" if dtype == "fp32" else "tf32"
    operands = {"q_ptr": elem, "k_cache_ptr": elem, "v_cache_ptr": elem, "out_ptr": elem}
    partials = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32"}
    common = dict(HEAD_DIM=256, BLOCK_D=256, SOFTCAP=True, WINDOW=True, PRECISION=precision)
    decode = _compile(
        pa._decode_kernel,
        arch,
        {**common, "BLOCK_G": 16, "BLOCK_N": 32, "SPLIT": True},
        {**operands, **partials},
    )
    merge = _compile(
        pa._decode_merge_kernel,
        arch,
        dict(HEAD_DIM=256, BLOCK_D=256, BLOCK_S=8, WINDOW=True),
        {"out_ptr": elem, **partials},
    )
    prefill = _compile(pa._prefill_kernel, arch, {**common, "BLOCK_M": 64, "BLOCK_N": 32}, operands)
    assert decode.asm["cubin"] and merge.asm["cubin"] and prefill.asm["cubin"]
    for compiled in (decode, prefill):
        assert re.search(
            r"ld\.global\S*\.v4|cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x10",
            compiled.asm["ptx"],
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_float64_on_gpu(kernel: str, window: int | None, dtype: torch.dtype) -> None:
    """Gemma-2-2B attention shapes (8 heads on 4 KV heads, head_dim 256, softcap 50) and long contexts."""
    spec = AttentionSpec(scale=256**-0.5, softcap=50.0, sliding_window=window)
    if kernel == "decode":
        contexts = [1, 17, 300, 1024, 2500, 4096]
        cached, new = [n - 1 for n in contexts], [1] * len(contexts)
    else:
        cached, new = [0, 0, 700, 2000], [1, 300, 129, 517]
    paged = to_device(make_case(cached, new, 2, 256, 16, spec, dtype, kv_heads=4), "cuda")
    if kernel == "decode":
        out = pa.paged_decode_attention(paged.q, paged.kv_cache, paged.block_tables, paged.context_lens, spec)
    else:
        out = pa.paged_prefill_attention(
            paged.q,
            paged.kv_cache,
            paged.block_tables,
            paged.context_lens,
            paged.query_starts,
            max(new),
            spec,
        )
    assert rel_error(out, to_device(paged, "cpu").expected()) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_replays_under_cuda_graph() -> None:
    """One captured launch serves other context lengths and block tables: results equal eager runs."""
    spec = AttentionSpec(scale=256**-0.5, softcap=50.0, sliding_window=None)
    first = to_device(
        make_case([99, 2000, 5], [1, 1, 1], 2, 256, 16, spec, torch.bfloat16, kv_heads=4), "cuda"
    )
    second = to_device(
        make_case([3000, 7, 63], [1, 1, 1], 2, 256, 16, spec, torch.bfloat16, 1, kv_heads=4), "cuda"
    )
    width = max(first.block_tables.shape[1], second.block_tables.shape[1])
    tables = torch.zeros(3, width, dtype=torch.int32, device="cuda")
    static = {"q": first.q.clone(), "lens": first.context_lens.clone(), "out": torch.empty_like(first.q)}
    caches = [torch.zeros(max(a.shape[0], b.shape[0]), *a.shape[1:], dtype=a.dtype, device="cuda")
              for a, b in zip(first.kv_cache, second.kv_cache, strict=True)]  # fmt: skip

    def load(case: PagedCase) -> None:
        tables.zero_()
        tables[:, : case.block_tables.shape[1]] = case.block_tables
        static["q"].copy_(case.q)
        static["lens"].copy_(case.context_lens)
        for cache, source in zip(caches, case.kv_cache, strict=True):
            cache[: source.shape[0]] = source

    def launch() -> None:
        pa.paged_decode_attention(static["q"], tuple(caches), tables, static["lens"], spec, out=static["out"])

    load(first)
    launch()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for case in (second, first):
        load(case)
        graph.replay()
        replayed = static["out"].clone()
        launch()
        torch.testing.assert_close(replayed, static["out"], atol=0, rtol=0)
        assert rel_error(replayed, to_device(case, "cpu").expected()) < TOLERANCE[torch.bfloat16]


@pytest.fixture(scope="module")
def bench():
    """bench/attention.py, imported from its path (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("loraplex_bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    sys.path.insert(0, str(BENCH_DIR))  # the script imports its sibling benchutil.py
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH_DIR))
        del sys.modules[spec.name]


def test_bench_shapes_and_bytes(bench) -> None:
    shapes = bench.Shapes.from_config()
    assert (shapes.num_heads, shapes.num_kv_heads, shapes.head_dim, shapes.softcap) == (8, 4, 256, 50.0)
    assert shapes.scale == 256**-0.5
    # Gemma-2-2B: 4 KiB of K/V per token per layer in 16-bit
    one, two = (bench.decode_bytes(shapes, bench.Point(32, s), 2) for s in (1024, 1025))
    assert two - one == 32 * 4096


def test_bench_plumbing_on_cpu(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both layer backends and the kernel run (interpreter) and agree; a stand-in timer replaces CUDA graphs."""
    monkeypatch.setenv(ATTENTION_ENV, "torch")
    calls = []
    result = bench.measure(
        bench.Shapes.from_config(),
        bench.Point(2, 40),
        torch.float32,
        "cpu",
        timer=lambda fn: calls.append(fn()) or 2.0,
    )
    assert len(calls) == 3 and result.us == {"kernel": 2.0, "triton": 2.0, "torch": 2.0}
    assert result.rel_error < 1e-5
    assert os.environ[ATTENTION_ENV] == "torch"  # restored
    assert bench.row(result, copy_bw=1e12)["x_torch"] == 1.0


def test_bench_exits_clearly_without_cuda(bench, monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--json", str(tmp_path / "a.json"), "--markdown", str(tmp_path / "a.md")]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
