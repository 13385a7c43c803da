"""Helpers for the HTTP tests: a real server: the real AsyncEngine on the tiny Llama, on a 127.0.0.1 port.

The app runs on its own event loop in a background thread, so the synchronous clients
(`huggingface_hub.InferenceClient`, `openai.OpenAI`) can call it from the test thread.
Reference outputs come from transformers + peft, greedy, float32 on CPU.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from loraplex.server.app import ServerSettings, create_app
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.demo_assets import TinyAssets
from loraplex.server.engine import EngineConfig
from loraplex.server.engine_api import LoadAdapterSpec

PROMPTS = ("the model serves", "a team loads small adapters", "each pod streams the queue")


def call(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP request: (status, headers, JSON body or text)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, response_headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, response_headers = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode()
    try:
        return status, response_headers, json.loads(text)
    except json.JSONDecodeError:
        return status, response_headers, text


class ServerThread:
    """An event loop in a daemon thread that hosts apps (and the engines' consumers)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-test-loop", daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            host, port = runner.addresses[0][:2]
            return f"http://{host}:{port}"

        return self.run(start())

    def close(self) -> None:
        for runner in self._runners:
            self.run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class LiveServer:
    url: str
    engine: AsyncEngine
    thread: ServerThread
    adapters: dict[str, Path]  # served name -> PEFT dir

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if call("GET", f"{self.url}/ready")[0] == 200:
                return
            time.sleep(0.05)
        raise TimeoutError("server never became ready")


def start_server(
    thread: ServerThread,
    assets: TinyAssets,
    adapters: dict[str, Path],
    settings: ServerSettings | None = None,
    **engine_options: Any,
) -> LiveServer:
    config = EngineConfig(model_path=str(assets.models["llama"]), **engine_options)
    engine = AsyncEngine.from_config(config)
    specs = tuple(LoadAdapterSpec(name, str(path)) for name, path in adapters.items())
    settings = settings or ServerSettings()
    app = create_app(engine, ServerSettings(**{**settings.__dict__, "startup_adapters": specs}))
    server = LiveServer(thread.start(app), engine, thread, adapters)
    server.wait_ready()
    return server


def five_adapters(assets: TinyAssets) -> dict[str, Path]:
    """The three demo adapters plus two more names over the same files (more adapters than slots)."""
    dirs = assets.adapters["llama"]
    return {**dirs, "a4-copy": dirs["a4"], "c16-copy": dirs["c16"]}


class Reference:
    """Greedy continuations from transformers + peft (float32, CPU), cached per (adapter, prompt)."""

    def __init__(self, assets: TinyAssets, adapters: dict[str, Path]) -> None:
        from transformers import AutoTokenizer

        self._model_dir = assets.models["llama"]
        self._adapters = adapters
        self.tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        self._models: dict[str | None, Any] = {}
        self._cache: dict[tuple[str | None, tuple[int, ...], int], list[int]] = {}

    def _model(self, adapter: str | None) -> Any:
        if adapter not in self._models:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(self._adapters[adapter]))
            self._models[adapter] = model.eval()
        return self._models[adapter]

    def token_ids(self, adapter: str | None, prompt_ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
        key = (adapter, prompt_ids, max_new_tokens)
        if key not in self._cache:
            import torch

            model = self._model(adapter)
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor([prompt_ids]),
                    attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            self._cache[key] = out[0, len(prompt_ids) :].tolist()
        return self._cache[key]

    def prompt_logprobs(self, adapter: str | None, prompt_ids: tuple[int, ...]) -> Any:
        """log_softmax of the logits over the prompt, float32 [len, vocab]: row p-1 scores token p."""
        import torch

        with torch.no_grad():
            logits = self._model(adapter)(input_ids=torch.tensor([prompt_ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def text(self, adapter: str | None, prompt: str, max_new_tokens: int) -> str:
        ids = self.token_ids(adapter, tuple(self.tokenizer(prompt)["input_ids"]), max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_text(self, adapter: str | None, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tuple(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        ids = self.token_ids(adapter, prompt_ids, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)
