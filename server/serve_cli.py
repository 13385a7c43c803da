"""`loraplex serve`: TGI-style flags (each with its environment variable), JSON logs, graceful stop.

    loraplex serve --model-id google/gemma-2-2b-it --lora-adapters "org/a,b=hf://org/b@v2"
    loraplex serve --demo        # the trained tiny Llama and its four demo fine-tunes, on CPU

SIGTERM or SIGINT: /ready turns 503 and requests are still served for `--shutdown-delay` seconds
(routing catches up), then stop accepting connections, let in-flight requests finish for up to
`--shutdown-timeout` seconds, then end the rest with a final `shutdown` error event and stop
the engine. The whole drain takes at most delay + timeout + 2 x FINAL_WRITE_TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from loraplex.server.adapters.startup import AdaptersFileWatcher, parse_lora_adapters, read_adapters_file
from loraplex.server.engine_api import Engine, LoadAdapterSpec
from loraplex.server.health_lag import LoopLagMonitor
from loraplex.server.routes.context import ServerSettings
from loraplex.server.routes.health import DRAIN
from loraplex.server.startup_heap import freeze_startup_objects

log = logging.getLogger("loraplex.serve")
FINAL_WRITE_TIMEOUT_S = 2.0
SWITCH_INTERVAL_S = 0.001  # per wait of aiohttp's, once the engine has ended every request
__all__ = ["add_arguments", "parse_lora_adapters", "read_adapters_file", "run", "serve"]


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return lowered in ("true", "1", "yes")


# flag, env, type, default, help
_FLAGS: tuple[tuple[str, str, Any, Any, str], ...] = (
    ("--model-id", "MODEL_ID", str, None, "hub id, hf://org/repo, file:///dir or a local dir"),
    ("--revision", "REVISION", str, None, "model revision (branch, tag or commit)"),
    ("--served-model-name", "SERVED_MODEL_NAME", str, None, "name clients use for the base model"),
    ("--lora-adapters", "LORA_ADAPTERS", str, "", "comma list of `id`, `id@rev` or `name=source[@rev]`"),
    ("--adapters-file", "ADAPTERS_FILE", str, None, "YAML/JSON list of {name, source, revision, sha256, ...}"),
    ("--hostname", "HOSTNAME", str, "0.0.0.0", "address to listen on"),
    ("--port", "PORT", int, 8080, "port to listen on"),
    ("--max-input-tokens", "MAX_INPUT_TOKENS", int, None, "longest prompt accepted"),
    ("--max-total-tokens", "MAX_TOTAL_TOKENS", int, None, "prompt + generated tokens, per request"),
    ("--max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", int, None, "token budget of one step"),
    ("--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", int, None, "more get 429"),
    ("--max-loras", "MAX_LORAS", int, None, "adapters in GPU slots at once"),
    ("--max-cpu-loras", "MAX_CPU_LORAS", int, None, "adapters kept in host memory"),
    ("--max-cpu-lora-bytes", "MAX_CPU_LORA_BYTES", int, None, "bytes of adapters kept in host memory"),
    ("--max-lora-rank", "MAX_LORA_RANK", int, None, "largest adapter rank accepted"),
    ("--max-adapter-bytes", "MAX_ADAPTER_BYTES", int, None, "larger adapters are refused"),
    ("--strict-base-model", "STRICT_BASE_MODEL", _boolean, None, "refuse adapters trained on another base"),
    ("--adapter-cache-dir", "ADAPTER_CACHE_DIR", str, None, "disk cache for downloaded adapters"),
    ("--adapters-file-poll", "ADAPTERS_FILE_POLL_S", float, 5.0, "seconds between checks of --adapters-file"),
    ("--adapter-keys-file", "ADAPTER_KEYS_FILE", str, None, "per-adapter access key digests (operator-written JSON), watched"),
    ("--kv-cache-memory-fraction", "KV_CACHE_MEMORY_FRACTION", float, None, "GPU memory share for the KV cache"),
    ("--cuda-graphs", "CUDA_GRAPHS", _boolean, None, "decode under CUDA graphs (true/false)"),
    ("--dtype", "DTYPE", str, "auto", "auto, bfloat16, float16 or float32"),
    ("--device", "DEVICE", str, None, "cuda or cpu (default: cuda when available)"),
    ("--hf-token", "HF_TOKEN", str, None, "token for gated or private hub repos"),
    ("--api-key", "API_KEY", str, None, "require `Authorization: Bearer <key>`"),
    ("--shutdown-timeout", "SHUTDOWN_TIMEOUT", float, 30.0, "seconds in-flight requests get on SIGTERM"),
    ("--shutdown-delay", "SHUTDOWN_DELAY", float, 0.0, "seconds of 503 on /ready, still serving, after SIGTERM"),
    ("--log-level", "LOG_LEVEL", str, "info", "debug, info, warning or error"),
    ("--log-format", "LOG_FORMAT", str, "json", "json or text"),
    ("--loop-lag-log", "LOOP_LAG_LOG", str, None, "append a JSON line per event-loop stall over 10 ms (diagnosis)"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, env, kind, default, help_text in _FLAGS:
        # argparse converts string defaults with `type`, so an env value is parsed like a flag.
        parser.add_argument(
            flag, type=kind, default=os.environ.get(env, default), help=f"{help_text} [env {env}]"
        )
    parser.add_argument(
        "--demo", action="store_true", help="serve the generated tiny model and its demo adapters"
    )


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    # The event loop shares the GIL with the engine thread and the tokenizer pool: hand it over
    # sooner (default 5 ms), so probes and streams wait less behind the engine's host work.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if args.hf_token:
        os.environ["HF_TOKEN"] = args.hf_token  # huggingface_hub reads it for every download
    try:
        model_id, adapters = _demo_assets() if args.demo else (args.model_id, ())
        if not model_id:
            log.error("no model: pass --model-id (or MODEL_ID), or --demo")
            return 2
        adapters += parse_lora_adapters(args.lora_adapters)
        watcher = (
            AdaptersFileWatcher(Path(args.adapters_file), args.adapters_file_poll)
            if args.adapters_file
            else None
        )
        if watcher is not None:
            adapters += watcher.read_initial()
    except (ValueError, OSError, yaml.YAMLError) as exc:
        log.error("invalid adapter list: %s", exc)
        return 2
    try:
        engine = build_engine(args, model_id)
    except Exception:
        log.exception("the engine failed to start", extra={"model": model_id})
        return 1
    settings = ServerSettings(
        api_key=args.api_key or None,
        adapter_keys_file=args.adapter_keys_file or None,
        adapter_keys_poll_s=args.adapters_file_poll,
        startup_adapters=adapters,
        model_id=model_id,
        info=_info(args),
    )
    lag = LoopLagMonitor(Path(args.loop_lag_log)) if args.loop_lag_log else None
    asyncio.run(
        serve(
            engine,
            settings,
            args.hostname,
            args.port,
            args.shutdown_timeout,
            watcher,
            args.shutdown_delay,
            lag,
        )
    )
    return 0


def _info(args: argparse.Namespace) -> dict[str, Any]:
    """Extra /info fields, as TGI names them; unset limits left out."""
    info = {
        "model_dtype": args.dtype,
        "model_device_type": engine_device(args),
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_batch_prefill_tokens": args.max_batch_prefill_tokens,
        "max_lora_adapters": args.max_loras,
    }
    return {key: value for key, value in info.items() if value is not None}


def _demo_assets() -> tuple[str, tuple[LoadAdapterSpec, ...]]:
    """The demo's trained tiny Llama and its fine-tunes (trained on first use, then cached)."""
    from loraplex.server.demo_training import build_trained_assets, default_root

    log.info("demo assets: training or reusing", extra={"root": str(default_root())})
    assets = build_trained_assets(report=log.info)
    adapters = tuple(LoadAdapterSpec(name=name, source=str(path)) for name, path in assets.adapters.items())
    return str(assets.model_dir), adapters


# flag attribute -> EngineConfig field
_ENGINE_FIELDS = {
    "revision": "revision",
    "served_model_name": "served_model_name",
    "dtype": "dtype",
    "max_input_tokens": "max_input_tokens",
    "max_total_tokens": "max_total_tokens",
    "max_batch_prefill_tokens": "max_batch_tokens",
    "max_concurrent_requests": "max_concurrent_requests",
    "max_loras": "max_loras",
    "max_cpu_loras": "max_cpu_loras",
    "max_cpu_lora_bytes": "max_cpu_lora_bytes",
    "max_lora_rank": "max_lora_rank",
    "max_adapter_bytes": "max_adapter_bytes",
    "strict_base_model": "strict_base_model",
    "adapter_cache_dir": "adapter_cache_dir",
    "kv_cache_memory_fraction": "kv_cache_memory_fraction",
    "cuda_graphs": "cuda_graphs",
}


def engine_config_kwargs(args: argparse.Namespace, known_fields: set[str]) -> dict[str, Any]:
    """EngineConfig arguments from the flags that were set; flags the engine lacks are logged."""
    kwargs: dict[str, Any] = {}
    for attr, name in _ENGINE_FIELDS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        if name in known_fields:
            kwargs[name] = value
        else:
            log.warning("flag not supported by this engine, ignored", extra={"flag": attr})
    return kwargs


def engine_device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_engine(args: argparse.Namespace, model_id: str) -> Engine:
    from loraplex.server.async_engine import AsyncEngine
    from loraplex.server.engine import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    device = engine_device(args)
    config = EngineConfig(model_path=model_id, device=device, **engine_config_kwargs(args, known))
    log.info("loading model", extra={"model": model_id, "device": device})
    return AsyncEngine.from_config(config)


async def serve(
    engine: Engine,
    settings: ServerSettings,
    host: str,
    port: int,
    shutdown_timeout: float,
    watcher: AdaptersFileWatcher | None = None,
    shutdown_delay: float = 0.0,
    lag: LoopLagMonitor | None = None,
) -> None:
    from loraplex.server.app import create_app

    app = create_app(engine, settings)
    if watcher is not None:
        app.cleanup_ctx.append(watcher.cleanup_ctx(engine))
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that hangs up cancels its handler, which aborts the request
        # aiohttp waits this twice per connection (for the handler, then after cancelling it); by then
        # the engine has ended every request, so handlers only write their final event.
        shutdown_timeout=FINAL_WRITE_TIMEOUT_S,
        access_log_class=JsonAccessLogger,
        access_log=logging.getLogger("loraplex.access"),
    )
    await runner.setup()
    frozen = freeze_startup_objects()  # before listening: no full GC pause while serving
    log.debug("start-up objects frozen", extra={"objects": frozen})
    await web.TCPSite(runner, host, port).start()
    log.info("serving", extra={"host": host, "port": port, "model": engine.model_name})
    if lag is not None:
        lag.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Routing lags a pod's termination by seconds (endpoints, kube-proxy, load balancer health
    # checks): keep serving with /ready at 503 so requests sent meanwhile are not refused.
    await drain(app, runner, engine, shutdown_delay, shutdown_timeout)
    if lag is not None:
        lag.stop()


async def drain(
    app: web.Application, runner: web.AppRunner, engine: Engine, delay_s: float, timeout_s: float
) -> None:
    """The drain budget (docs/errors.md): `delay_s` of 503 on /ready while still serving, then up
    to `timeout_s` for requests in flight, then at most 2 x FINAL_WRITE_TIMEOUT_S for handlers to
    write the final events; the operator keeps delay + timeout <= grace period - 5 s."""
    app[DRAIN].draining = True
    log.info("draining", extra={"delay_s": delay_s})
    await asyncio.sleep(delay_s)
    log.info("shutting down", extra={"timeout_s": timeout_s})
    for site in list(runner.sites):
        await site.stop()  # no new connections; open ones get 503 shutting_down from the engine
    # Waits for requests in flight up to timeout_s, then ends the rest with a `shutdown` error event.
    await engine.shutdown(timeout_s=timeout_s)
    await runner.cleanup()
    log.info("stopped")


class JsonAccessLogger(AbstractAccessLogger):
    """One record per request; probes and scrapes only at debug level."""

    _QUIET = frozenset({"/health", "/ready", "/metrics"})

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        level = logging.DEBUG if request.path in self._QUIET else logging.INFO
        fields = {"method": request.method, "path": request.path, "status": response.status}
        self.logger.log(
            level, "request", extra={**fields, "duration_s": round(time, 4), "remote": request.remote}
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={...}` fields become keys."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
