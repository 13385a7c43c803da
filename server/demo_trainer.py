"""How the demo's models are trained: `transformers.Trainer` on token-id examples, one torch
thread per process, a progress line with the time left, and several trainings at once in
worker processes (`server/demo_training.py` says what is trained)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import resource
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # labels the loss skips (prompt tokens, padding)
Report = Callable[[str], None]
Example = dict[str, list[int]]  # input_ids and labels


@dataclass(frozen=True)
class Schedule:
    """One training run's loop settings."""

    epochs: int
    learning_rate: float
    seed: int
    batch_size: int = 16
    warmup_steps: int = 10


def make_collator(pad_id: int) -> Callable[[Sequence[Example]], dict[str, Any]]:
    """Right-pads a batch; padding is masked out of attention and loss."""
    import torch

    def collate(batch: Sequence[Example]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in batch)
        ids, labels, mask = [], [], []
        for item in batch:
            pad = width - len(item["input_ids"])
            ids.append(item["input_ids"] + [pad_id] * pad)
            labels.append(item["labels"] + [IGNORE] * pad)
            mask.append([1] * len(item["input_ids"]) + [0] * pad)
        tensors = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        return {key: torch.tensor(value) for key, value in tensors.items()}

    return collate


def train(
    model: Any, examples: list[Example], pad_id: int, schedule: Schedule, label: str, report: Report
) -> None:
    """`Trainer.train()` on the CPU: shuffled with the seed, cosine schedule, no checkpoints."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    # One thread: these matmuls are too small to split, and on a shared machine a second
    # OpenMP thread spinning at every barrier made training seven times slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loraplex-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=schedule.batch_size,
            num_train_epochs=schedule.epochs,
            learning_rate=schedule.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=schedule.warmup_steps,
            weight_decay=0.0,
            seed=schedule.seed,
            data_seed=schedule.seed,
            use_cpu=True,
            save_strategy="no",
            report_to=[],
            logging_strategy="steps",
            logging_steps=5,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=make_collator(pad_id),
            callbacks=[_progress(label, report)],
        )
        trainer.remove_callback(PrinterCallback)  # our own line instead of a dict per log
        try:
            with warnings.catch_warnings():  # Trainer calls a method transformers deprecates for v6
                warnings.simplefilter("ignore", FutureWarning)
                trainer.train()
        finally:
            torch.set_num_threads(threads)


def _progress(label: str, report: Report) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A line every few seconds: step, loss, and the time left at the current pace."""

        def __init__(self) -> None:
            self.started = self.last = time.monotonic()
            self.loss = float("nan")

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            self.loss = (logs or {}).get("loss", self.loss)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            now = time.monotonic()
            done = state.global_step >= state.max_steps
            if now - self.last < 5 and not done:
                return
            self.last = now
            left = (now - self.started) / state.global_step * (state.max_steps - state.global_step)
            tail = f"done in {now - self.started:.0f}s" if done else f"about {left:.0f}s left"
            step = f"step {state.global_step}/{state.max_steps}"
            report(f"  training {label}: {step}, loss {self.loss:.2f}, {tail}")

    return Progress()


# --- several at once --------------------------------------------------------------------------

_worker_lines: multiprocessing.Queue[str] | None = None


def worker_report() -> Report:
    """Inside `run_parallel`'s workers: sends lines to the parent's `report`; elsewhere print."""
    return _worker_lines.put if _worker_lines is not None else print


def run_parallel(function: Callable[..., None], calls: list[tuple[Any, ...]], report: Report) -> None:
    """`function(*args)` for each of `calls`, two at a time in spawned worker processes where
    there are two cores (each on one torch thread, see `train`), in order where there is one.
    `function` takes its report from `worker_report()`; the lines come back here."""
    workers = min(2, os.cpu_count() or 1)
    if workers == 1:
        for args in calls:
            function(*args)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch state
    lines: multiprocessing.Queue[str] = context.Queue()
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(lines,)
    ) as pool:
        futures = [pool.submit(function, *args) for args in calls]
        while not all(future.done() for future in futures):
            _drain(lines, report, timeout=0.5)
        _drain(lines, report, timeout=0)
        for future in futures:
            future.result()  # re-raises a worker's error


def _worker_init(lines: multiprocessing.Queue[str]) -> None:
    global _worker_lines
    _worker_lines = lines
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _drain(lines: multiprocessing.Queue[str], report: Report, timeout: float) -> None:
    try:
        while True:
            report(lines.get(timeout=timeout) if timeout else lines.get_nowait())
    except queue.Empty:
        pass


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers."""
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)
