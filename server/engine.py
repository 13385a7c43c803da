"""LLMEngine: the synchronous core. `step()` = schedule, run the model, sample, report.

Single-threaded by design: `AsyncEngine` owns it from one background thread. Everything
here is called from that thread only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.server.adapters.host_cache import HostCacheLimits
from loraplex.server.adapters.loader import LoaderConfig
from loraplex.server.adapters.registry import AdapterEntry, AdapterRegistry
from loraplex.server.block_manager import BlockManager
from loraplex.server.detokenizer import IncrementalDetokenizer, OutputText
from loraplex.server.engine_api import (
    EngineStats,
    InvalidRequestError,
    LoadAdapterSpec,
    UnknownAdapterError,
)
from loraplex.server.forward_batch import DecodeStep, ForwardBatch, SequenceChunk
from loraplex.server.model_runner import ModelRunner, RunnerConfig
from loraplex.server.prompt_logprobs import PromptScoring
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sampler import NON_FINITE, RowFailure, SampledToken, Sampler, SamplingRow, wants_logprobs
from loraplex.server.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from loraplex.server.sequence import GeneratedTokens, Sequence
from loraplex.server.steady_decode import SteadyBatch
from loraplex.server.text_fanout import StepOutput, TextJob, TokenBatch, expand

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine; validated once, never mutated."""

    model_path: str
    served_model_name: str | None = None  # default: the model path's last component
    dtype: str = "auto"
    device: str = "cpu"
    revision: str | None = None
    max_loras: int = 4  # adapter slots on the device
    max_cpu_loras: int = 64  # adapters kept parsed in host memory (the rest are re-read from disk)
    max_cpu_lora_bytes: int | None = None  # and their total bytes, when set
    max_lora_rank: int = 64
    max_adapter_bytes: int = 2 << 30  # larger adapters are refused (too_large)
    strict_base_model: bool = False  # base_model_name_or_path mismatch: refuse instead of warn
    adapter_cache_dir: str | None = None  # disk tier for downloaded adapters
    max_batch_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    max_num_seqs: int = 64  # sequences running at once (the rest wait in the queue)
    max_concurrent_requests: int = 128  # in flight, waiting included; more -> QueueFullError
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048  # prompt + generated
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized by the model runner
    kv_cache_memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # decode steps under CUDA graphs (CUDA only); False: eager
    adapters: tuple[LoadAdapterSpec, ...] = ()  # loaded at start

    def __post_init__(self) -> None:
        if self.max_input_tokens < 1 or self.max_total_tokens <= self.max_input_tokens:
            raise ValueError("need 1 <= max_input_tokens < max_total_tokens")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.max_adapter_bytes < 1:
            raise ValueError("max_adapter_bytes must be >= 1")
        self.host_cache_limits()  # validates max_cpu_loras and max_cpu_lora_bytes

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path.rstrip("/").rsplit("/", 1)[-1]

    def adapter_loader_config(self) -> LoaderConfig:
        names = (self.model_path, self.model_name)
        return LoaderConfig(
            base_model_names=tuple(dict.fromkeys(names)),
            strict_base_model=self.strict_base_model,
            max_adapter_bytes=self.max_adapter_bytes,
            cache_dir=Path(self.adapter_cache_dir) if self.adapter_cache_dir else None,
        )

    def host_cache_limits(self) -> HostCacheLimits:
        return HostCacheLimits(self.max_cpu_loras, self.max_cpu_lora_bytes)

    def runner_config(self) -> RunnerConfig:
        return RunnerConfig(
            model_path=self.model_path,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            revision=self.revision,
            max_num_seqs=self.max_num_seqs,
            max_batch_tokens=self.max_batch_tokens,
            max_model_len=self.max_total_tokens,
            cuda_graphs=self.cuda_graphs,
        )


@dataclass
class _RequestState:
    """A request's bookkeeping, made once when it arrives so a step only appends to it."""

    request: GenerationRequest
    seq: Sequence
    output: OutputText
    generated: GeneratedTokens  # its generated token ids (the sampling row's live view)
    sampling_row: SamplingRow  # the same object every step: the sampler reuses its plan while the batch stays
    length_limit: int  # tokens (prompt + generated) at which it ends with LENGTH
    has_stop_strings: bool
    pending_token: int | None = None  # deferred text: the token the fan-out thread appends

    @classmethod
    def make(
        cls, request: GenerationRequest, seq: Sequence, output: OutputText, max_total: int
    ) -> _RequestState:
        generated = GeneratedTokens(seq)
        row = SamplingRow(seq.seq_id, request.params, request.prompt_token_ids, generated)
        limit = min(len(request.prompt_token_ids) + request.params.max_new_tokens, max_total)
        return cls(request, seq, output, generated, row, limit, any(request.params.stop))


def eos_token_ids(hf_config: Any, tokenizer: Any, model_path: str) -> frozenset[int]:
    """EOS ids from the generation config, the model config and the tokenizer, together."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        sources = [GenerationConfig.from_pretrained(model_path).eos_token_id]
    except (OSError, ValueError):
        sources = []
    sources += [getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer: Any) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.block_manager = BlockManager(
            runner.num_kv_blocks, runner.block_size, config.enable_prefix_caching
        )
        self.registry = AdapterRegistry(runner.max_loras)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_batch_tokens=config.max_batch_tokens),
            self.block_manager,
            self.registry,
        )
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids(runner.hf_config, tokenizer, str(runner.model_path))
        self._requests: dict[str, _RequestState] = {}
        self.num_steps = 0
        self.num_failed_steps_in_a_row = 0  # steps in which no request could run (for /health)
        # Called with each step's plan before it runs (benchmarks, tests, tracing); never mutate it.
        self.step_observers: list[Callable[[ScheduledStep], None]] = []
        # True (AsyncEngine): events of requests without stop strings come with text "" and a
        # TextJob (take_text_jobs) that its fan-out thread runs off the step's critical path.
        self.defer_text = False
        self._text_jobs: list[TextJob] = []
        self._scoring_seq_ids: set[int] = set()  # sequences whose prompt logprobs are not handed out yet
        self._steady: SteadyBatch | None = None  # the running decode batch, while it repeats

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from transformers import AutoTokenizer

        runner = ModelRunner(config.runner_config())
        return cls(config, runner, AutoTokenizer.from_pretrained(str(runner.model_path)))

    # -- requests ----------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise the typed error a request deserves before it is queued."""
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty")
        if num_prompt > self.config.max_input_tokens:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens, more than max_input_tokens={self.config.max_input_tokens}"
            )
        if num_prompt + request.params.max_new_tokens > self.config.max_total_tokens:
            raise InvalidRequestError(
                f"prompt tokens ({num_prompt}) + max_new_tokens ({request.params.max_new_tokens}) must be "
                f"<= max_total_tokens={self.config.max_total_tokens}"
            )
        if (
            self.block_manager.num_blocks_for(num_prompt + request.params.max_new_tokens)
            > self.block_manager.num_blocks
        ):
            raise InvalidRequestError(
                f"prompt + max_new_tokens ({num_prompt + request.params.max_new_tokens} tokens) cannot fit in "
                f"the KV cache ({self.block_manager.num_blocks * self.block_manager.block_size} tokens)"
            )
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if request.adapter is not None and request.adapter not in self.registry:
            raise UnknownAdapterError(f"adapter {request.adapter!r} is not loaded")
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")

    def add_request(self, request: GenerationRequest) -> None:
        self.validate(request)
        ref = self.registry.retain(request.adapter) if request.adapter is not None else None
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params, ref, time.monotonic())
        leader = self._requests.get(request.shares_prompt_with or "")
        if leader is not None and (leader.seq.prompt_token_ids, leader.seq.adapter) == (
            seq.prompt_token_ids,
            ref,
        ):
            seq.prompt_leader = leader.seq
        if seq.prompt_logprobs is not None:
            self._scoring_seq_ids.add(seq.seq_id)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        output = OutputText(detokenizer, request.params.stop)
        self._requests[request.request_id] = _RequestState.make(
            request, seq, output, self.config.max_total_tokens
        )
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None):
        """End a request now; returns its final event (None if it is not in the engine)."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        return self._finish(state, reason, error=error)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One step's events (`step_outputs`, its batches expanded here, texts made)."""
        return expand(self.step_outputs())

    def step_outputs(self) -> list[StepOutput]:
        """One step: its events, where a steady decode step hands out one `TokenBatch` for the rows
        that simply go on (`AsyncEngine` expands it on its fan-out thread)."""
        outputs = self._steady_step()
        return self._step() if outputs is None else outputs

    def _step(self) -> list[TokenEvent]:
        step = self.scheduler.schedule()
        if step.is_empty:
            return []
        self.apply_slot_updates()
        for observe in self.step_observers:
            observe(step)
        logits, failures = self._execute(step)
        if not failures:
            self.scheduler.update_after_step(step)
            self.num_steps += 1
            self.num_failed_steps_in_a_row = 0
            return self._postprocess(step, logits)
        ran = ScheduledStep([c for c in step.chunks if c[0].seq_id not in failures])
        self.scheduler.update_after_step(ran)
        self.num_steps += 1
        self.num_failed_steps_in_a_row = 0 if ran.chunks else self.num_failed_steps_in_a_row + 1
        failed = [self._fail(seq, error) for seq, _ in step.chunks if (error := failures.get(seq.seq_id))]
        return failed + self._postprocess(ran, logits)

    # -- the steady decode step (see `steady_decode`) -------------------------------------------

    def _steady_step(self) -> list[StepOutput] | None:
        """The step as columns when it decodes the running sequences of the last one again; None:
        nothing done, the step takes the general path (admissions, preemption, a failed batch...)."""
        planned = self._schedule_steady()
        if planned is None:
            return None
        batch, grown = planned
        if self.registry.has_slot_updates:
            self.apply_slot_updates()
        if self.step_observers:
            plan = ScheduledStep([(seq, 1) for seq in batch.seqs])
            for observe in self.step_observers:
                observe(plan)
        try:
            logits = self.runner.execute_decode(self._decode_step(batch, grown))
        except Exception:
            log.warning("steady decode step failed, taking the general path", exc_info=True)
            self._steady = None
            return None
        self.num_steps += 1
        self.num_failed_steps_in_a_row = 0
        return self._postprocess_decode(batch, logits)

    def _schedule_steady(self) -> tuple[SteadyBatch, list[int]] | None:
        """The steady batch if this step decodes it again, and its rows that got a new block."""
        scheduler = self.scheduler
        batch = self._steady
        if batch is None or not scheduler.repeats_decodes(batch.version, batch.num_seqs):
            batch = self._steady = self._new_steady()
            if batch is None:
                return None
        grown = batch.grown_rows()
        if grown and not scheduler.extend_decodes(batch.seqs, grown):
            return None
        return batch, grown

    def _decode_step(self, batch: SteadyBatch, grown: list[int]) -> DecodeStep:
        if grown:
            seqs, bs = batch.seqs, batch.block_size
            blocks = tuple((j, seqs[j].block_table[seqs[j].num_cached_tokens // bs]) for j in grown)
        else:
            blocks = ()
        return DecodeStep(batch, batch.index, batch.next_ids, blocks, batch.forward_batch)

    def _steady_forward_batch(self, seqs: tuple[Sequence, ...]) -> ForwardBatch:
        """A steady batch's step as a `ForwardBatch` (`DecodeStep.chunks`, when the runner rebuilds it)."""
        return self._forward_batch(ScheduledStep([(seq, 1) for seq in seqs]))

    def _new_steady(self) -> SteadyBatch | None:
        """A steady batch of the running sequences, if the next step decodes exactly them."""
        scheduler = self.scheduler
        running = scheduler.running
        if (
            not running
            or self._scoring_seq_ids
            or not scheduler.repeats_decodes(scheduler.version, len(running))
        ):
            return None
        states = []
        for seq in running:
            state = self._requests[seq.request_id]
            if seq.num_uncomputed_tokens != 1 or wants_logprobs(state.request.params):
                return None
            states.append(state)
        batch = SteadyBatch(
            states, scheduler.version, self.block_manager.block_size, self.eos_token_ids, self.defer_text
        )
        batch.forward_batch = functools.partial(self._steady_forward_batch, batch.seqs)
        return batch

    def _postprocess_decode(self, batch: SteadyBatch, logits: torch.Tensor) -> list[StepOutput]:
        """The steady step's tokens: appended column-wise, the special rows one by one.

        The scheduler's commit of the step (`Scheduler.commit_decodes`) happens first, as in the
        general path, folded into the same pass over the rows.
        """
        try:
            tokens = self.sampler.sample_ids(logits, batch.rows)
        except Exception:
            log.warning("sampling failed, sampling %d rows one by one", batch.num_seqs, exc_info=True)
            self._steady = None
            self.scheduler.commit_decodes(batch.seqs, batch.full_rows())
            rows = self._sample_rows(logits, list(batch.rows))
            return [self._accept_or_fail(s, t) for s, t in zip(batch.states, rows, strict=True)]
        special = batch.special_rows(tokens)
        full = batch.full_rows()
        batch.steps_to_limit -= 1
        index, batch.index, batch.next_ids = batch.index, batch.index + 1, tokens
        if not special:
            self.scheduler.commit_decodes(batch.seqs, full, batch.appends, tokens)
            return [self._token_batch(batch, tokens, index, {})]
        self.scheduler.commit_decodes(batch.seqs, full)
        events: dict[int, TokenEvent] = {}
        for j, (append, token) in enumerate(zip(batch.appends, tokens, strict=True)):
            if j in special:
                state = batch.states[j]
                events[j] = self._accept_or_fail(state, SampledToken(token) if token >= 0 else NON_FINITE)
            else:
                append(token)
        if len(events) == len(tokens):
            return list(events.values())
        return [self._token_batch(batch, tokens, index, events)]

    @staticmethod
    def _token_batch(batch: SteadyBatch, tokens: list[int], index: int, special: dict) -> TokenBatch:
        return TokenBatch(
            batch.request_ids,
            tokens,
            batch.num_prompt_tokens,
            batch.base_generated,
            index,
            batch.outputs,
            special,
        )

    def _execute(self, step: ScheduledStep) -> tuple[torch.Tensor, dict[int, str]]:
        """Logits of the step's chunks, and the errors of the chunks that could not run.

        When the batch fails as a whole, nobody can tell whose input caused it: each chunk is
        run again alone (the failed pass wrote the same K/V positions they rewrite), so only
        the requests that fail on their own end with an error.
        """
        try:
            return self._run_model(step), {}
        except Exception as exc:
            if len(step.chunks) == 1:
                log.exception("model step failed")
                return self._no_logits(), {step.chunks[0][0].seq_id: f"model step failed: {exc}"}
            log.warning(
                "model step failed, running its %d requests one by one", len(step.chunks), exc_info=True
            )
        rows, failures = [], {}
        for chunk in step.chunks:
            try:
                rows.append(self._run_model(ScheduledStep([chunk])))
            except Exception as exc:
                failures[chunk[0].seq_id] = f"model step failed: {exc}"
        return (torch.cat(rows) if rows else self._no_logits()), failures

    def _run_model(self, step: ScheduledStep) -> torch.Tensor:
        """The runner's logits; for chunks that score their prompt, their prompt logprobs too."""
        batch = self._forward_batch(step)
        scoring = self._prompt_scoring(step)
        if not scoring:
            return self.runner.execute(batch)
        logits, scores = self.runner.execute_scoring(batch, scoring)
        for entries, s in zip(scores, scoring, strict=True):
            seq = step.chunks[s.chunk_index][0]
            seq.prompt_logprobs.record(seq.num_cached_tokens, entries)  # type: ignore[union-attr]
        return logits

    def _prompt_scoring(self, step: ScheduledStep) -> list[PromptScoring]:
        if not self._scoring_seq_ids:
            return []
        return [
            scoring
            for i, (seq, num_new) in enumerate(step.chunks)
            if seq.prompt_logprobs is not None
            and (scoring := seq.prompt_logprobs.scoring(i, seq.token_ids, seq.num_cached_tokens, num_new))
        ]

    def _no_logits(self) -> torch.Tensor:
        return torch.empty(0, self.runner.vocab_size)

    def _fail(self, seq: Sequence, error: str) -> TokenEvent:
        return self._finish(self._requests[seq.request_id], FinishReason.ERROR, error=error)

    def apply_slot_updates(self) -> None:
        """Copy adapters the scheduler brought in into their slots; clear freed ones."""
        for update in self.registry.take_slot_updates():
            if update.weights is None:
                self.runner.clear_lora(update.slot)
            else:
                self.runner.load_lora(update.slot, update.weights)

    def _forward_batch(self, step: ScheduledStep) -> ForwardBatch:
        chunks = []
        for seq, num_new in step.chunks:  # positional arguments: this runs per sequence per step
            start = seq.num_cached_tokens
            chunks.append(
                SequenceChunk(
                    seq.seq_id,
                    tuple(seq.token_ids[start : start + num_new]),
                    start,
                    tuple(seq.block_table),
                    seq.lora_slot,
                    start + num_new == len(seq.token_ids),  # needs_logits
                    start != seq.num_prefix_hit_tokens,  # continues: not its first step since admission
                )
            )
        return ForwardBatch(tuple(chunks))

    def _postprocess(self, step: ScheduledStep, logits: torch.Tensor) -> list[TokenEvent]:
        """One event per sequence that got a token: O(the step's sequences), whatever their lengths."""
        chunks = step.chunks
        seqs = [seq for seq, _ in chunks if seq.num_cached_tokens == len(seq.token_ids)]
        if not seqs:
            return []
        if len(seqs) < len(chunks):  # some chunks were prefill that has not reached its prompt's end
            logits = logits[
                [i for i, (seq, _) in enumerate(chunks) if seq.num_cached_tokens == len(seq.token_ids)]
            ]
        states = [self._requests[seq.request_id] for seq in seqs]
        sampled = self._sample(logits, [state.sampling_row for state in states])
        return [self._accept_or_fail(state, token) for state, token in zip(states, sampled, strict=True)]

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken | RowFailure]:
        """The batch's tokens; if the sampler fails as a whole, each row again alone (see `_execute`)."""
        try:
            return self.sampler(logits, rows)
        except Exception:
            log.warning("sampling failed, sampling %d rows one by one", len(rows), exc_info=True)
        return self._sample_rows(logits, rows)

    def _sample_rows(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken | RowFailure]:
        results: list[SampledToken | RowFailure] = []
        for i, row in enumerate(rows):
            try:
                results += self.sampler(logits[i : i + 1], [row])
            except Exception as exc:
                results.append(RowFailure(f"sampling failed: {exc}"))
        return results

    def _accept_or_fail(self, state: _RequestState, token: SampledToken | RowFailure) -> TokenEvent:
        """One request's new token; a failure here (sampling, decoding) ends that request only."""
        seq = state.seq
        if isinstance(token, RowFailure):
            return self._finish(state, FinishReason.ERROR, error=token.error)
        try:
            return self._accept(state, token)
        except Exception as exc:
            log.exception("request failed after sampling", extra={"request_id": seq.request_id})
            if seq.request_id not in self._requests:
                raise  # it finished already: the failure is in the bookkeeping, not in the request
            return self._finish(state, FinishReason.ERROR, error=f"decoding failed: {exc}")

    def _accept(self, state: _RequestState, token: SampledToken) -> TokenEvent:
        seq, params, token_id = state.seq, state.request.params, token.token_id
        seq.append_token(token_id)
        reason = None
        if token_id in params.stop_token_ids:
            reason = FinishReason.STOP
        elif token_id in self.eos_token_ids and not params.ignore_eos:
            reason = FinishReason.EOS
        defers = self.defer_text and not state.has_stop_strings
        if defers:
            text, state.pending_token = "", token_id if reason is None else None
        else:
            text = state.output.append(token_id) if reason is None else ""
            if state.output.stopped:
                reason = FinishReason.STOP
        if reason is None and len(seq.token_ids) >= state.length_limit:
            reason = FinishReason.LENGTH
        if reason is not None:
            return self._finish(state, reason, token=token, text=text)
        if seq.prompt_logprobs is not None:
            return self._event(state, token=token, text=text)
        # The event of a request that goes on (`_event` inlined: this runs per sequence per step).
        event = TokenEvent(
            request_id=state.request.request_id,
            token_id=token_id,
            text=text,
            logprob=token.logprob,
            top_logprobs=token.top_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=len(seq.token_ids) - seq.num_prompt_tokens,
        )
        if defers:
            self._text_jobs.append(TextJob(event, state.output, token_id, False))
            state.pending_token = None
        return event

    def _finish(
        self,
        state: _RequestState,
        reason: FinishReason,
        token: SampledToken | None = None,
        text: str = "",
        error: str | None = None,
    ) -> TokenEvent:
        seq = state.seq
        self.scheduler.finish(seq, reason)
        self.sampler.free(seq.seq_id)
        if seq.adapter is not None:
            self.registry.release(seq.adapter)
        del self._requests[seq.request_id]
        # A cancelled request wants no more text, a failed one's may be broken.
        if reason not in (FinishReason.CANCELLED, FinishReason.ERROR) and not self._defers_text(state):
            text += state.output.finish()
        return self._event(state, token=token, text=text, finish_reason=reason, error=error)

    def _event(
        self,
        state: _RequestState,
        token: SampledToken | None,
        text: str,
        finish_reason: FinishReason | None = None,
        error: str | None = None,
    ) -> TokenEvent:
        seq = state.seq
        prompt_logprobs = seq.prompt_logprobs.take() if seq.prompt_logprobs is not None else None
        if prompt_logprobs is not None or finish_reason is not None:
            self._scoring_seq_ids.discard(seq.seq_id)
        event = TokenEvent(
            request_id=state.request.request_id,
            token_id=token.token_id if token else None,
            text=text,
            logprob=token.logprob if token else None,
            top_logprobs=token.top_logprobs if token else (),
            finish_reason=finish_reason,
            error=error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=len(seq.token_ids) - seq.num_prompt_tokens,
            prompt_logprobs=prompt_logprobs,
        )
        if self._defers_text(state):
            finish = finish_reason not in (None, FinishReason.CANCELLED, FinishReason.ERROR)
            self._text_jobs.append(TextJob(event, state.output, state.pending_token, finish))
            state.pending_token = None
        return event

    def _defers_text(self, state: _RequestState) -> bool:
        return self.defer_text and not state.has_stop_strings

    def take_text_jobs(self) -> list[TextJob]:
        """The text still to make for the events returned since the last call (see `defer_text`)."""
        jobs, self._text_jobs = self._text_jobs, []
        return jobs

    def abort_all(self, reason: FinishReason, error: str | None = None) -> list[TokenEvent]:
        """End every request (shutdown; or a failed step, rather than hang them all)."""
        return [self._finish(s, reason, error=error) for s in list(self._requests.values())]

    # -- adapters and stats ------------------------------------------------------------------

    def add_adapter(self, entry: AdapterEntry) -> AdapterEntry:
        return self.registry.add(entry)

    def remove_adapter(self, name: str) -> AdapterEntry:
        return self.registry.remove(name)

    def stats(self) -> EngineStats:
        running = self.scheduler.running
        waiting = self.scheduler.waiting
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_cache_usage=self.block_manager.usage,
            max_loras=self.registry.max_loras,
            running_adapters=tuple(sorted({s.adapter_name for s in running if s.adapter_name})),
            waiting_adapters=tuple(sorted({s.adapter_name for s in waiting if s.adapter_name})),
            extra={
                "num_preemptions": self.scheduler.num_preemptions,
                "num_prefix_hit_tokens": self.block_manager.num_prefix_hit_tokens,
                "num_prefix_query_tokens": self.block_manager.num_prefix_query_tokens,
                "num_steps": self.num_steps,
                "adapter_slot_loads": self.registry.num_slot_loads,
                "adapter_slot_evictions": self.registry.num_slot_evictions,
            },
        )
