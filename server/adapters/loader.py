"""From a `LoadAdapterSpec` to validated `LoraWeights`: fetch the source, check it, parse it.

Blocking (downloads, file reads): the engine runs it in a worker thread, never on the decode
loop. Every refusal is an `AdapterLoadError` whose `error_type` names the reason, so the
operator can show it (`rank_exceeds_max`, `base_model_mismatch`, `integrity`, ...).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.server.adapters.credentials import read_credentials
from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.fetch_partial import sweep_partials
from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.owned_store import OwnedCopy, own_copy, sweep_staging
from loraplex.server.adapters.peft_format import WEIGHTS_FILE, AdapterValidationError, load_peft_adapter
from loraplex.server.adapters.sources import FetchOptions, fetch, parse_source
from loraplex.server.engine_api import AdapterLoadError, LoadAdapterSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """How adapters are fetched and what is accepted; from EngineConfig, fixed at start."""

    base_model_names: tuple[str, ...] = ()  # names the served base goes by (path, hub id, served name)
    strict_base_model: bool = False  # base_model_name_or_path mismatch: error instead of warning
    max_adapter_bytes: int = 2 << 30
    cache_dir: Path | None = None  # disk tier; default: $TMPDIR/loraplex-adapters

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or Path(tempfile.gettempdir()) / "loraplex-adapters"


class SourceLoader:
    """The engine's `AdapterLoader`: any source URI -> validated weights (worker thread)."""

    def __init__(self, config: LoaderConfig) -> None:
        self.config = config
        for path in sweep_staging(config.resolved_cache_dir):  # what a crashed run left behind
            log.warning("removed an abandoned download", extra={"path": str(path)})
        for path in sweep_partials(config.resolved_cache_dir):  # too old to resume
            log.warning("removed a stale partial download", extra={"path": str(path)})

    def __call__(self, spec: LoadAdapterSpec, model_config: Any, max_rank: int) -> LoraWeights:
        """Fetch, copy into the server's own store, validate and parse from that copy.

        `metadata` gets `owned_dir` (what read-backs re-read, with `sha256` checked), `sha256`
        (of the weights file, computed here) and `revision` (the hub commit, when known)."""
        started = time.monotonic()
        directory = self.resolve(spec)
        self._check_size(directory, spec.name)  # before copying it
        owned = self.own(directory, spec)
        weights = self.read(owned.directory, spec, model_config, max_rank)
        weights.metadata |= {
            "owned_dir": str(owned.directory),
            "sha256": owned.sha256,
            "revision": owned.revision,
        }
        log.info(
            "adapter read",
            extra={
                "adapter": spec.name,
                "bytes": weights.num_bytes,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return weights

    def resolve(self, spec: LoadAdapterSpec) -> Path:
        """A local directory with the adapter's files (downloaded into the disk cache if remote)."""
        credentials = read_credentials(spec.name)
        options = FetchOptions(
            cache_dir=self.config.resolved_cache_dir,
            token=spec.token or credentials.get("token") or os.environ.get("HF_TOKEN") or None,
            sha256=spec.sha256,
            max_bytes=self.config.max_adapter_bytes,
            progress=_ProgressLog(spec.name),
            credentials=credentials,
        )
        try:
            return fetch(parse_source(spec.source, spec.revision), options)
        except SourceError as exc:
            raise AdapterLoadError(f"adapter {spec.name!r}: {exc}", exc.error_type) from exc
        except OSError as exc:
            raise AdapterLoadError(f"adapter {spec.name!r}: {exc}", "adapter_download") from exc

    def own(self, directory: Path, spec: LoadAdapterSpec) -> OwnedCopy:
        try:
            return own_copy(directory, self.config.resolved_cache_dir)
        except SourceError as exc:
            raise AdapterLoadError(f"adapter {spec.name!r}: {exc}", exc.error_type) from exc

    def read(self, directory: Path, spec: LoadAdapterSpec, model_config: Any, max_rank: int) -> LoraWeights:
        """Validate and parse a local PEFT directory."""
        self._check_size(directory, spec.name)
        try:
            weights = load_peft_adapter(directory, spec.name, model_config, max_rank)
        except AdapterValidationError as exc:
            raise AdapterLoadError(f"adapter {spec.name!r}: {exc}", exc.error_type) from exc
        except OSError as exc:
            raise AdapterLoadError(
                f"adapter {spec.name!r}: cannot read {directory}: {exc}", "source"
            ) from exc
        self._check_base_model(weights, spec.name)
        return weights

    def _check_size(self, directory: Path, name: str) -> None:
        size = (directory / WEIGHTS_FILE).stat().st_size if (directory / WEIGHTS_FILE).is_file() else 0
        if size > self.config.max_adapter_bytes:
            raise AdapterLoadError(
                f"adapter {name!r}: {size} bytes of weights, over the {self.config.max_adapter_bytes}-byte limit "
                "(MAX_ADAPTER_BYTES)",
                "too_large",
            )

    def _check_base_model(self, weights: LoraWeights, name: str) -> None:
        declared = weights.base_model_name_or_path
        if (
            not declared
            or not self.config.base_model_names
            or base_model_matches(declared, self.config.base_model_names)
        ):
            return
        message = (
            f"adapter {name!r} was trained on {declared!r}, this server serves "
            f"{self.config.base_model_names[0]!r}"
        )
        if self.config.strict_base_model:
            raise AdapterLoadError(f"{message} (STRICT_BASE_MODEL is on)", "base_model_mismatch")
        log.warning(message, extra={"adapter": name, "base_model_name_or_path": declared})


def base_model_matches(declared: str, served: tuple[str, ...]) -> bool:
    """Same model when the full ids match, or the last path components do (local copies of a hub id)."""
    wanted = _model_key(declared)
    return any(_model_key(name) == wanted or _model_key(name)[-1:] == wanted[-1:] for name in served)


def _model_key(name: str) -> tuple[str, ...]:
    name = name.strip().removeprefix("hf://").removeprefix("file://").split("@", 1)[0].rstrip("/")
    return tuple(part.lower() for part in name.split("/") if part)


def to_host_layout(weights: LoraWeights, dtype: torch.dtype, pin: bool) -> LoraWeights:
    """The slot buffers' dtype (half the bytes of float32 for bf16), page-locked when `pin`, so the
    copy into a slot between two steps is one plain, fast transfer per tensor."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        return t.pin_memory() if pin else t

    weights.tensors = {key: (convert(a), convert(b)) for key, (a, b) in weights.tensors.items()}
    return weights


class _ProgressLog:
    """Download progress in the log: at most one line per 10% (or per 64 MiB without a total)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last = -1

    def __call__(self, done: int, total: int | None) -> None:
        mark = done * 10 // total if total else done >> 26
        if mark != self._last:
            self._last = mark
            log.info("adapter download", extra={"adapter": self.name, "bytes": done, "total": total})
