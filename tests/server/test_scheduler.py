"""Scheduler policy, simulated without a model: chunked prefill, preemption, adapter slots."""

from __future__ import annotations

import subprocess
import sys

from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.registry import AdapterEntry, AdapterRegistry
from loraplex.server.block_manager import BlockManager
from loraplex.server.request import FinishReason
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from loraplex.server.sequence import AdapterRef, Sequence


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, max_loras: int = 2, **cfg: int
) -> tuple[Scheduler, AdapterRegistry]:
    registry = AdapterRegistry(max_loras)
    for name in "abcdef":
        weights = LoraWeights(name=name, rank=4, target_modules=("q_proj",), tensors={})
        registry.add(AdapterEntry(ref=AdapterRef(name, 0), weights=weights, source=f"/x/{name}"))
    sched = Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size), registry)
    return sched, registry


def add(
    sched: Scheduler,
    registry: AdapterRegistry,
    n_prompt: int,
    adapter: str | None = None,
    max_new: int = 4,
    rid: str = "r",
) -> Sequence:
    ref = registry.retain(adapter) if adapter else None
    seq = Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_new_tokens=max_new), ref)
    sched.add(seq)
    return seq


def fake_step(sched: Scheduler) -> ScheduledStep:
    """What the engine does around the model: advance the cache, 'sample', finish."""
    step = sched.schedule()
    step.slots_at_schedule = [(s.adapter, s.lora_slot) for s, _ in step.chunks]  # type: ignore[attr-defined]
    sched.update_after_step(step)
    for seq, _ in step.chunks:
        if seq.num_cached_tokens == seq.num_tokens:
            seq.append_token(7)
            if seq.num_generated_tokens >= seq.params.max_new_tokens:
                sched.finish(seq, FinishReason.LENGTH)
    return step


def run_to_completion(sched: Scheduler, max_steps: int = 500) -> list[ScheduledStep]:
    steps = []
    while sched.has_unfinished() and len(steps) < max_steps:
        steps.append(fake_step(sched))
    assert not sched.has_unfinished()
    return steps


def test_long_prompt_is_prefilled_in_chunks_alongside_decodes() -> None:
    sched, reg = make_scheduler(max_batch_tokens=8)
    short = add(sched, reg, 3, max_new=10)
    fake_step(sched)
    long = add(sched, reg, 20)
    sizes = []
    for _ in range(3):
        step = fake_step(sched)
        sizes.append({s.request_id if s is not short else "short": n for s, n in step.chunks})
        assert step.num_tokens <= 8
        assert short in [s for s, _ in step.chunks]  # decode never stalls behind the prefill
    assert [d["r"] for d in sizes] == [7, 7, 6]
    assert long.num_generated_tokens == 1


def test_running_first_then_fifo() -> None:
    sched, reg = make_scheduler(max_num_seqs=2)
    seqs = [add(sched, reg, 2, rid=f"r{i}") for i in range(3)]
    step = fake_step(sched)
    assert [s for s, _ in step.chunks] == seqs[:2]
    assert sched.num_waiting == 1


def test_preemption_under_tiny_kv_budget_completes_everything() -> None:
    sched, reg = make_scheduler(num_blocks=6, block_size=2)
    seqs = [add(sched, reg, 3, max_new=6, rid=f"r{i}") for i in range(4)]
    steps = run_to_completion(sched)
    assert sched.num_preemptions > 0
    assert all(s.num_generated_tokens == 6 and s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert any(step.preempted for step in steps)
    assert sched.block_manager.num_free_blocks == 6


def test_never_more_adapters_in_a_step_than_slots() -> None:
    sched, reg = make_scheduler(max_loras=2)
    seqs = [add(sched, reg, 3, adapter="abcdef"[i % 6], max_new=3, rid=f"r{i}") for i in range(18)]
    seqs += [add(sched, reg, 3, max_new=3, rid="base")]
    steps = run_to_completion(sched)
    for step in steps:
        adapters = {ref for ref, _ in step.slots_at_schedule if ref}  # type: ignore[attr-defined]
        slots = {slot for ref, slot in step.slots_at_schedule if ref}  # type: ignore[attr-defined]
        assert len(adapters) <= 2 and len(slots) == len(adapters)
    assert all(s.num_generated_tokens == 3 for s in seqs)


def test_busy_adapter_cannot_starve_a_waiting_one() -> None:
    sched, reg = make_scheduler(max_loras=1)
    add(sched, reg, 2, adapter="a", max_new=50, rid="a0")
    fake_step(sched)
    lonely = add(sched, reg, 2, adapter="b", max_new=2, rid="b0")
    # A stream of new requests for `a` keeps arriving; `b` must still get the slot.
    for i in range(200):
        add(sched, reg, 2, adapter="a", max_new=2, rid=f"a{i + 1}")
        fake_step(sched)
        if lonely.is_finished:
            break
    assert lonely.is_finished


def test_slot_is_released_on_finish_and_reused() -> None:
    sched, reg = make_scheduler(max_loras=1)
    a = add(sched, reg, 2, adapter="a", max_new=1)
    b = add(sched, reg, 2, adapter="b", max_new=1)
    run_to_completion(sched)
    assert a.is_finished and b.is_finished
    assert [u.slot for u in reg.take_slot_updates()] == [0]  # b took a's slot


def test_abort_waiting_and_running_frees_blocks() -> None:
    sched, reg = make_scheduler(num_blocks=8, max_num_seqs=1)
    running = add(sched, reg, 5)
    waiting = add(sched, reg, 5)
    fake_step(sched)
    sched.finish(running, FinishReason.CANCELLED)
    sched.finish(waiting, FinishReason.CANCELLED)
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 8


def test_repeated_prompt_hits_prefix_cache() -> None:
    sched, reg = make_scheduler(block_size=4)
    add(sched, reg, 9, adapter="a", max_new=1)
    run_to_completion(sched)
    again = add(sched, reg, 9, adapter="a", max_new=1, rid="again")
    other = add(sched, reg, 9, adapter="b", max_new=1, rid="other")
    step = fake_step(sched)
    assert {s.request_id: n for s, n in step.chunks} == {"again": 1, "other": 9}
    assert again.num_prefix_hit_tokens == 8 and other.num_prefix_hit_tokens == 0


def test_pure_policy_modules_import_no_torch() -> None:
    code = (
        "import sys, loraplex.server.scheduler, loraplex.server.block_manager, loraplex.server.adapters.registry;"
        "assert 'torch' not in sys.modules and 'aiohttp' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
