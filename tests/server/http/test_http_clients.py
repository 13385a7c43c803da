"""Existing clients, unchanged, against the real server: outputs equal the transformers+peft reference."""

from __future__ import annotations

import openai
import pytest
from http_server_support import PROMPTS, LiveServer, Reference, call
from huggingface_hub import InferenceClient

MAX_NEW = 8
ADAPTERS = (None, "a4", "b8", "c16")  # None = the base model
CHAT = [{"role": "user", "content": "Please write a short poem about the sea."}]


@pytest.fixture(scope="module")
def hf(live_server: LiveServer) -> InferenceClient:
    return InferenceClient(base_url=live_server.url)


@pytest.fixture(scope="module")
def oai(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def _model(adapter: str | None) -> str:
    return adapter or "tiny-llama"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_text_generation_matches_reference(
    hf: InferenceClient, reference: Reference, adapter: str | None
) -> None:
    for prompt in PROMPTS:
        expected = reference.text(adapter, prompt, MAX_NEW)
        assert hf.text_generation(prompt, adapter_id=adapter, max_new_tokens=MAX_NEW) == expected


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_text_generation_details(hf: InferenceClient, reference: Reference, adapter: str | None) -> None:
    prompt = PROMPTS[1]
    out = hf.text_generation(prompt, adapter_id=adapter, max_new_tokens=MAX_NEW, details=True)
    prompt_ids = tuple(reference.tokenizer(prompt)["input_ids"])
    expected_ids = reference.token_ids(adapter, prompt_ids, MAX_NEW)
    assert out.generated_text == reference.text(adapter, prompt, MAX_NEW)
    assert [t.id for t in out.details.tokens] == expected_ids
    assert out.details.generated_tokens == len(expected_ids)
    assert out.details.finish_reason in ("length", "eos_token")
    assert all(t.logprob is not None and t.logprob <= 0 for t in out.details.tokens)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_text_generation_stream_details(
    hf: InferenceClient, reference: Reference, adapter: str | None
) -> None:
    prompt = PROMPTS[2]
    events = list(
        hf.text_generation(prompt, adapter_id=adapter, max_new_tokens=MAX_NEW, stream=True, details=True)
    )
    expected = reference.text(adapter, prompt, MAX_NEW)
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == expected
    assert events[-1].details.generated_tokens == len(events)
    assert events[-1].details.input_length == len(reference.tokenizer(prompt)["input_ids"])
    assert "".join(e.token.text for e in events if not e.token.special) == expected


def test_text_generation_stream_plain_tokens(hf: InferenceClient, reference: Reference) -> None:
    pieces = list(hf.text_generation(PROMPTS[0], adapter_id="b8", max_new_tokens=MAX_NEW, stream=True))
    assert "".join(pieces) == reference.text("b8", PROMPTS[0], MAX_NEW)


def test_return_full_text_and_generate_route(live_server: LiveServer, reference: Reference) -> None:
    body = {
        "inputs": PROMPTS[0],
        "parameters": {"adapter_id": "c16", "max_new_tokens": 4, "return_full_text": True},
    }
    status, headers, out = call("POST", f"{live_server.url}/generate", body)
    assert status == 200
    assert out == {"generated_text": PROMPTS[0] + reference.text("c16", PROMPTS[0], 4)}
    assert headers["x-generated-tokens"] == "4"


@pytest.mark.parametrize("adapter", ("a4", "c16"))
def test_hf_chat_completion(hf: InferenceClient, reference: Reference, adapter: str) -> None:
    out = hf.chat_completion(CHAT, model=adapter, max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].message.content == reference.chat_text(adapter, CHAT, MAX_NEW)
    assert out.model == adapter
    streamed = hf.chat_completion(CHAT, model=adapter, max_tokens=MAX_NEW, temperature=0, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == out.choices[0].message.content
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_openai_completions(oai: openai.OpenAI, reference: Reference, adapter: str | None) -> None:
    prompt = PROMPTS[0]
    expected = reference.text(adapter, prompt, MAX_NEW)
    out = oai.completions.create(model=_model(adapter), prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].text == expected
    assert out.usage.prompt_tokens == len(reference.tokenizer(prompt)["input_ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(
        oai.completions.create(
            model=_model(adapter),
            prompt=prompt,
            max_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_openai_chat(oai: openai.OpenAI, reference: Reference, adapter: str | None) -> None:
    expected = reference.chat_text(adapter, CHAT, MAX_NEW)
    out = oai.chat.completions.create(model=_model(adapter), messages=CHAT, max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].message.content == expected
    assert out.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(
        model=_model(adapter), messages=CHAT, max_tokens=MAX_NEW, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_openai_logprobs(oai: openai.OpenAI, reference: Reference) -> None:
    out = oai.completions.create(model="a4", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.token_logprobs) == out.usage.completion_tokens
    # greedy: the chosen token is the most likely of the alternatives
    for chosen, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(alternatives.values()), abs=1e-5)
    chat = oai.chat.completions.create(
        model="a4", messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 1 for entry in content)


def test_openai_stop_sequence_is_cut(oai: openai.OpenAI, reference: Reference) -> None:
    full = reference.text("b8", PROMPTS[0], MAX_NEW)
    stop = full[len(full) // 2 :][:2]
    assert stop.strip(), "the reference continuation must have text to stop on"
    expected = full[: full.index(stop)]
    out = oai.completions.create(
        model="b8", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    chunks = oai.completions.create(
        model="b8", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_models_list_base_and_adapters(oai: openai.OpenAI, live_server: LiveServer) -> None:
    models = {m.id: m for m in oai.models.list().data}
    assert set(models) == {"tiny-llama", *live_server.adapters}
    assert models["tiny-llama"].parent is None
    for name, path in live_server.adapters.items():
        assert models[name].parent == "tiny-llama"
        assert models[name].root == str(path)


def test_info_names_adapters(live_server: LiveServer) -> None:
    status, _, info = call("GET", f"{live_server.url}/info")
    assert status == 200
    assert info["model_id"] == "tiny-llama"
    assert set(info["adapters"]) == set(live_server.adapters)
    assert info["max_total_tokens"] == live_server.engine.max_total_tokens


def test_adapters_really_change_the_output(reference: Reference) -> None:
    """Guards the tests above: an adapter silently served by the base model would fail them."""
    texts = {adapter: reference.text(adapter, PROMPTS[0], MAX_NEW) for adapter in ADAPTERS}
    assert len(set(texts.values())) == len(ADAPTERS)


def test_tgi_stop_sequence_stays_in_the_output(hf: InferenceClient, reference: Reference) -> None:
    full = reference.text("b8", PROMPTS[0], MAX_NEW)
    stop = full[len(full) // 2 :][:2]
    out = hf.text_generation(PROMPTS[0], adapter_id="b8", max_new_tokens=MAX_NEW, stop=[stop], details=True)
    assert out.details.finish_reason == "stop_sequence"
    assert stop in out.generated_text and full.startswith(out.generated_text)
    assert out.generated_text.index(stop) == full.index(stop)
    events = list(
        hf.text_generation(
            PROMPTS[0], adapter_id="b8", max_new_tokens=MAX_NEW, stop=[stop], stream=True, details=True
        )
    )
    assert "".join(e.token.text for e in events) == events[-1].generated_text == out.generated_text


def test_tgi_seed_and_top_n_tokens(hf: InferenceClient) -> None:
    def sample(seed: int) -> str:
        return hf.text_generation(
            PROMPTS[1], adapter_id="c16", max_new_tokens=MAX_NEW, do_sample=True, seed=seed
        )

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1
    out = hf.text_generation(PROMPTS[1], adapter_id="a4", max_new_tokens=3, top_n_tokens=2, details=True)
    assert len(out.details.top_tokens) == 3
    for chosen, alternatives in zip(out.details.tokens, out.details.top_tokens, strict=True):
        assert len(alternatives) == 2
        # the client leaves these nested entries as dicts
        assert alternatives[0]["id"] == chosen.id  # greedy picks the most likely
        assert alternatives[0]["logprob"] >= alternatives[1]["logprob"]
