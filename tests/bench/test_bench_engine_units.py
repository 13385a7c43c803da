"""bench/engine.py, bench/random_checkpoint.py and bench/baselines.py on CPU with a tiny random checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300, "query_pre_attn_scalar": 16, "sliding_window": 8}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(bench_checkpoint, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Gemma-2 architecture at toy size: the same writer the GPU runs use, three rank-16 adapters."""
    root = tmp_path_factory.mktemp("random-checkpoint")
    config = json.loads((CONFIGS / "gemma-2-2b-config.json").read_text()) | TINY
    (root / "tiny.json").write_text(json.dumps(config))
    spec = bench_checkpoint.CheckpointSpec(root / "tiny.json", root / "model", dtype=torch.float32)
    return spec.out, bench_checkpoint.ensure_checkpoint(spec, 3, 16)


def test_floors_reproduce_the_design_figures(bench_engine, bench_checkpoint):
    gemma = bench_checkpoint.read_config(CONFIGS / "gemma-2-2b-config.json")
    floors = bench_engine.floors_for(gemma, 16, 2.98e12)  # DESIGN §9: one H100, 2.98 TB/s copy
    assert floors.weight_bytes / 2 / 1e9 == pytest.approx(2.61, abs=0.01)
    assert floors.adapter_bytes / 1e6 == pytest.approx(41.5, abs=0.05)
    assert floors.step_s(0) * 1e3 == pytest.approx(1.76, abs=0.01)
    assert floors.step_s(32) * 1e3 == pytest.approx(2.20, abs=0.01)
    mistral = bench_checkpoint.read_config(CONFIGS / "mistral-7b-v0.1-config.json")
    assert bench_engine.weight_bytes(mistral) / 2.98e12 * 1e3 == pytest.approx(4.85, abs=0.02)
    qv = bench_checkpoint.adapter_bytes(mistral, 16, ("q_proj", "v_proj"))
    assert qv / 1e6 == pytest.approx(13.6, abs=0.05)  # DESIGN §9: the blog's magicoder size


def test_sweep_skips_more_adapters_than_rows(bench_engine):
    points = bench_engine.sweep([1, 8, 32, 64], [0, 1, 8, 32])
    assert len(points) == 2 + 3 + 4 + 4
    assert all(p.adapters <= p.batch for p in points)


def test_without_cuda_nothing_is_measured_or_written(bench_engine, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.fail("this test checks the CPU-only behaviour; it runs in CI without a GPU")
    code = bench_engine.main(["--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")])
    assert code == 1 and "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_random_checkpoint_loads_in_the_engine_with_id_tokens_and_no_eos(bench_engine, tiny_checkpoint):
    model, adapters = tiny_checkpoint
    args = bench_engine.parse_args(["--batches", "4", "--adapters", "0,3", "--steps", "3",
                                    "--warmup-steps", "1", "--prompt-tokens", "6"])  # fmt: skip
    engine = bench_engine.build_engine(model, adapters, args, device="cpu")
    assert engine.tokenizer("w5 w17 w299")["input_ids"] == [5, 17, 299]
    assert engine.tokenizer.decode([0, 5, 17], skip_special_tokens=True) == "w0 w5 w17"
    assert engine.eos_token_ids == frozenset()  # fixed output lengths on every API
    assert {e.name for e in engine.registry.entries()} == {"a0", "a1", "a2"}
    assert engine.registry.get("a2").weights.rank == 16
    floors = bench_engine.Floors(weight_bytes=10**6, adapter_bytes=10**5, copy_bytes_per_s=1e9)
    for point in bench_engine.sweep(args.batches, args.adapters):
        result = bench_engine.measure_point(engine, point, args, floors)
        row = result.row()
        assert 0 < row["forward_ms"] <= row["step_ms"]
        assert row["tok_s"] == pytest.approx(4 / result.step_ms * 1e3, rel=1e-3)
        assert row["floor_ms"] == pytest.approx((1 + 0.1 * point.adapters), rel=1e-6)
    assert not engine.has_unfinished()  # every request of the sweep was aborted after timing


def test_reports_put_the_measured_numbers_next_to_the_target(bench_engine, tmp_path):
    args = bench_engine.parse_args(["--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")])
    results = [
        bench_engine.PointResult(bench_engine.Point(32, 32), step_ms=3.0, forward_ms=2.5, floor_ms=2.2)
    ]
    base = [{"name": "peft", "batch": 32, "distinct_adapters": 32, "ms_per_step": 1000.0, "tok_s": 32.0}]
    env = {"gpu": "G", "date": "D", "commit": "C", "torch": "t", "transformers": "x", "peft": "p",
           "copy_GBps": 1, "weight_GB": 5.2, "adapter_MB": 41.5}  # fmt: skip
    bench_engine.write_reports(results, base, env, args)
    md = (tmp_path / "e.md").read_text()
    assert "3.00 ms/step, 1.36x its 2.20 ms floor (meets the 1.5x target)" in md
    assert "333x slower" in md  # 10667 tok/s against PEFT's 32
    assert json.loads((tmp_path / "e.json").read_text())["rows"][0]["x_floor"] == 1.36


def test_peft_mixes_adapters_in_one_generate_batch(bench_baselines, tiny_checkpoint):
    model, adapters = tiny_checkpoint
    found = bench_baselines.run_baselines(model, adapters, batch=3, prompt_tokens=4,
                                          new_tokens={"transformers": 3, "peft": 2}, device="cpu",
                                          dtype=torch.float32)  # fmt: skip
    base, peft = found
    assert (base.name, base.distinct_adapters, base.new_tokens) == ("transformers", 0, 3)
    assert (peft.name, peft.distinct_adapters, peft.batch) == ("peft", 3, 3)
    assert peft.tok_s == pytest.approx(3 * 2 / peft.seconds)
