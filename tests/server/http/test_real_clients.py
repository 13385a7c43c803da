"""The clients users already run, unchanged, against the real app on a real port (issue 16).

`text-generation` (TGI's own client), `openai` and `huggingface_hub.InferenceClient`: every call
here failed before this server spoke their dialects (nullable fields, `model: "tgi"`/`"dummy"`,
`n`/`best_of`, lists of prompts, OpenAI's 400 errors, TGI's error types, `/tokenize`, `/info`).
Greedy outputs are compared with the transformers + peft reference.
"""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
import text_generation
from http_server_support import PROMPTS, LiveServer, Reference, call
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from text_generation.types import Message

MAX_NEW = 6
CHAT = [{"role": "user", "content": "Please write a short poem about the sea."}]


# --- text-generation (TGI's client) ------------------------------------------------------------


def test_tgi_client_chat_sends_model_tgi_and_null_n(
    tgi: text_generation.Client, reference: Reference
) -> None:
    out = tgi.chat([Message(role="user", content=CHAT[0]["content"])], max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].message.content == reference.chat_text(None, CHAT, MAX_NEW)
    assert out.model == "tiny-llama" and out.usage["completion_tokens"] >= 1


def test_tgi_client_chat_stream_yields_every_chunk(tgi: text_generation.Client, reference: Reference) -> None:
    chunks = list(tgi.chat([Message(**CHAT[0])], max_tokens=MAX_NEW, temperature=0, stream=True))
    assert len(chunks) >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.chat_text(None, CHAT, MAX_NEW)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_tgi_client_generate_and_stream(tgi: text_generation.Client, reference: Reference) -> None:
    # text-generation 0.7's request model has no adapter_id: it can only address the base model.
    expected = reference.text(None, PROMPTS[0], MAX_NEW)
    out = tgi.generate(PROMPTS[0], max_new_tokens=MAX_NEW)
    assert out.generated_text == expected
    assert out.details.generated_tokens == len(out.details.tokens) and out.details.prefill == []
    events = list(tgi.generate_stream(PROMPTS[0], max_new_tokens=MAX_NEW))
    assert events[-1].generated_text == expected
    assert "".join(e.token.text for e in events if not e.token.special) == expected


def test_tgi_client_best_of_returns_the_other_sequences(tgi: text_generation.Client) -> None:
    out = tgi.generate(PROMPTS[1], max_new_tokens=MAX_NEW, best_of=3, do_sample=True)
    others = out.details.best_of_sequences
    assert others is not None and len(others) == 2

    def score(tokens) -> float:
        return sum(t.logprob for t in tokens)

    assert all(score(out.details.tokens) >= score(o.tokens) - 1e-6 for o in others)  # the best comes first
    with pytest.raises(text_generation.errors.ValidationError, match="sampling"):
        tgi.generate(PROMPTS[1], max_new_tokens=2, best_of=2)


def test_tgi_client_typed_errors(tgi: text_generation.Client) -> None:
    with pytest.raises(text_generation.errors.ValidationError):
        tgi.generate(PROMPTS[0], max_new_tokens=5000)


# --- huggingface_hub.InferenceClient -----------------------------------------------------------


def test_hf_chat_completion_without_model_is_the_base(hf: InferenceClient, reference: Reference) -> None:
    out = hf.chat_completion(CHAT, max_tokens=MAX_NEW, temperature=0)  # sends model "dummy"
    assert out.choices[0].message.content == reference.chat_text(None, CHAT, MAX_NEW)
    pieces = [
        c.choices[0].delta.content or ""
        for c in hf.chat_completion(CHAT, max_tokens=MAX_NEW, temperature=0, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == reference.chat_text(None, CHAT, MAX_NEW)


@pytest.mark.parametrize("adapter", ["a4", "c16"])
def test_hf_chat_completion_with_model(hf: InferenceClient, reference: Reference, adapter: str) -> None:
    out = hf.chat_completion(CHAT, model=adapter, max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].message.content == reference.chat_text(adapter, CHAT, MAX_NEW)
    stream = hf.chat_completion(CHAT, model=adapter, max_tokens=MAX_NEW, temperature=0, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == out.choices[0].message.content
    )


def test_hf_chat_completion_unknown_model_is_404(hf: InferenceClient) -> None:
    with pytest.raises(Exception) as excinfo:
        hf.chat_completion(CHAT, model="no-such-adapter", max_tokens=2)
    assert excinfo.value.response.status_code == 404  # type: ignore[attr-defined]


def test_hf_endpoint_info_has_tgi_fields(live_server: LiveServer) -> None:
    # huggingface_hub 1.x/2.x ask /info only for a `model` URL on the "hf-inference" provider
    info = InferenceClient(model=live_server.url, provider="hf-inference").get_endpoint_info()
    for key in (
        "max_concurrent_requests",
        "max_best_of",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "version",
        "sha",
        "model_id",
    ):
        assert key in info, key
    assert info["max_concurrent_requests"] == 256 and info["max_best_of"] >= 4
    assert info["max_input_tokens"] < info["max_total_tokens"]


def test_hf_text_generation_stream_and_best_of(hf: InferenceClient, reference: Reference) -> None:
    pieces = list(hf.text_generation(PROMPTS[2], adapter_id="b8", max_new_tokens=MAX_NEW, stream=True))
    assert "".join(pieces) == reference.text("b8", PROMPTS[2], MAX_NEW)
    out = hf.text_generation(
        PROMPTS[2], adapter_id="b8", max_new_tokens=MAX_NEW, best_of=2, do_sample=True, details=True
    )
    assert len(out.details.best_of_sequences) == 1
    with pytest.raises(ValidationError, match="seed"):  # TGI's rule: best_of samples with random seeds
        hf.text_generation(PROMPTS[2], max_new_tokens=2, best_of=2, do_sample=True, seed=3)


# --- openai ------------------------------------------------------------------------------------


def test_openai_n_choices_in_one_request(oai: openai.OpenAI, reference: Reference) -> None:
    out = oai.completions.create(model="a4", prompt=PROMPTS[0], max_tokens=MAX_NEW, n=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert {c.text for c in out.choices} == {reference.text("a4", PROMPTS[0], MAX_NEW)}  # greedy: all equal
    assert out.usage.prompt_tokens == len(reference.tokenizer(PROMPTS[0])["input_ids"])
    sampled = oai.completions.create(
        model="a4", prompt=PROMPTS[0], max_tokens=MAX_NEW, n=4, seed=1, temperature=1.5
    )
    assert len({c.text for c in sampled.choices}) > 1  # each choice has its own seed
    chat = oai.chat.completions.create(model="b8", messages=CHAT, max_tokens=MAX_NEW, n=2, temperature=0)
    assert [c.message.content for c in chat.choices] == [reference.chat_text("b8", CHAT, MAX_NEW)] * 2


def test_openai_best_of_picks_the_most_likely(oai: openai.OpenAI) -> None:
    out = oai.completions.create(
        model="c16",
        prompt=PROMPTS[1],
        max_tokens=MAX_NEW,
        n=1,
        best_of=3,
        seed=5,
        temperature=1.5,
        logprobs=0,
    )
    assert len(out.choices) == 1 and out.usage.completion_tokens >= 3  # three were generated
    alone = [
        oai.completions.create(
            model="c16", prompt=PROMPTS[1], max_tokens=MAX_NEW, seed=5 + i, temperature=1.5, logprobs=0
        )
        for i in range(3)
    ]
    best = max(alone, key=lambda r: sum(r.choices[0].logprobs.token_logprobs))
    assert out.choices[0].text == best.choices[0].text


def test_openai_stream_with_n_and_usage(oai: openai.OpenAI, reference: Reference) -> None:
    stream = oai.completions.create(
        model="a4",
        prompt=PROMPTS[1],
        max_tokens=MAX_NEW,
        n=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert texts == {i: reference.text("a4", PROMPTS[1], MAX_NEW) for i in (0, 1)}
    assert usage is not None and usage.completion_tokens == 2 * MAX_NEW


def test_openai_continuous_usage_stats(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="a4",
        messages=CHAT,
        max_tokens=MAX_NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    counts = [c.usage.completion_tokens for c in stream if c.choices and c.usage is not None]
    assert len(counts) >= MAX_NEW and counts == sorted(counts) and counts[-1] == MAX_NEW


def test_openai_list_of_prompts_and_token_ids(oai: openai.OpenAI, reference: Reference) -> None:
    out = oai.completions.create(model="b8", prompt=list(PROMPTS[:2]), max_tokens=MAX_NEW, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [
        reference.text("b8", p, MAX_NEW) for p in PROMPTS[:2] for _ in "ab"
    ]
    ids = [reference.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    by_ids = oai.completions.create(model="b8", prompt=ids, max_tokens=MAX_NEW, temperature=0)
    assert [c.text for c in by_ids.choices] == [reference.text("b8", p, MAX_NEW) for p in PROMPTS[:2]]


def test_openai_logprobs_and_echo(oai: openai.OpenAI, reference: Reference) -> None:
    out = oai.completions.create(model="a4", prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == MAX_NEW and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    echo = oai.completions.create(model="a4", prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[2] + reference.text("a4", PROMPTS[2], MAX_NEW)
    chat = oai.chat.completions.create(
        model="a4", messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert len(chat.choices[0].logprobs.content) == 3


def test_openai_errors_are_the_sdk_typed_exceptions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.completions.create(model="a4", prompt="hi", max_tokens=50_000)
    assert too_long.value.code == "context_length_exceeded"
    assert "maximum context length" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as unsupported:
        oai.chat.completions.create(model="a4", messages=CHAT, response_format={"type": "json_object"})
    assert unsupported.value.param == "response_format" and unsupported.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="a4", prompt="hi", max_tokens=0)


def test_openai_nullable_fields_and_optional_model(live_server: LiveServer, reference: Reference) -> None:
    nulls = {
        "n": None,
        "logprobs": None,
        "stream": None,
        "echo": None,
        "best_of": None,
        "stop": None,
        "temperature": 0,
        "max_tokens": MAX_NEW,
    }
    status, _, out = call("POST", f"{live_server.url}/v1/completions", {"prompt": PROMPTS[0], **nulls})
    assert status == 200, out
    assert out["choices"][0]["text"] == reference.text(None, PROMPTS[0], MAX_NEW)
    assert out["model"] == "tiny-llama"
    for model in (None, "tgi", "dummy", "tiny-llama"):
        body = {
            "messages": CHAT,
            "max_tokens": MAX_NEW,
            "temperature": 0,
            "n": None,
            "logprobs": None,
            "stream": None,
            "model": model,
        }
        status, _, out = call("POST", f"{live_server.url}/v1/chat/completions", body)
        assert status == 200, (model, out)
        assert out["choices"][0]["message"]["content"] == reference.chat_text(None, CHAT, MAX_NEW)
    status, _, out = call(
        "POST", f"{live_server.url}/v1/chat/completions", {"messages": CHAT, "model": "a-team/x"}
    )
    assert status == 404 and out["error"]["code"] == "model_not_found"


def test_tokenize_route(live_server: LiveServer, reference: Reference) -> None:
    status, _, out = call("POST", f"{live_server.url}/tokenize", {"inputs": PROMPTS[1]})
    assert status == 200
    assert [t["id"] for t in out] == reference.tokenizer(PROMPTS[1])["input_ids"]
    assert all(PROMPTS[1][t["start"] : t["stop"]] == t["text"] for t in out)


def test_tgi_stream_without_done_but_openai_streams_end_with_done(live_server: LiveServer) -> None:
    def events(model: str) -> list[str]:
        body = json.dumps({"model": model, "messages": CHAT, "max_tokens": 2, "stream": True}).encode()
        request = urllib.request.Request(
            f"{live_server.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return [line for line in response.read().decode().splitlines() if line.startswith("data:")]

    assert events("a4")[-1] == "data: [DONE]"
    assert all(json.loads(line[5:]) for line in events("tgi"))
