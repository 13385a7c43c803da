"""Prompt log-probabilities through the clients users run (issue 16), against transformers + peft.

`openai` completions with `echo` + `logprobs` (also `max_tokens=0`, lm-eval's loglikelihood call)
and vLLM's `prompt_logprobs` extension on completions and chat; TGI's `decoder_input_details`
through `text-generation` and `huggingface_hub.InferenceClient`. Every figure is compared with
log_softmax of the reference model's logits over the same prompt (base and adapters).
"""

from __future__ import annotations

import openai
import pytest
import text_generation
from http_server_support import PROMPTS, LiveServer, Reference, call
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from loraplex.server.routes.generation import TokenTexts

MAX_NEW = 4
ATOL = 1e-4
CHAT = [{"role": "user", "content": "Score this prompt, token by token."}]


def ids_of(reference: Reference, prompt: str) -> tuple[int, ...]:
    return tuple(reference.tokenizer(prompt)["input_ids"])


def decode(reference: Reference, token_id: int) -> str:
    return reference.tokenizer.decode([token_id])


def assert_echoed_prompt(
    lp, reference: Reference, adapter: str | None, ids: tuple[int, ...], top: int
) -> None:
    """The first len(ids) entries of a completion's logprobs: the prompt, scored as the reference scores it."""
    expected = reference.prompt_logprobs(adapter, ids)
    assert lp.tokens[: len(ids)] == [decode(reference, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    for p in range(1, len(ids)):
        row = expected[p - 1]
        assert lp.token_logprobs[p] == pytest.approx(float(row[ids[p]]), abs=ATOL), p
        want = {decode(reference, ids[p]): float(row[ids[p]])}  # the prompt token, then the `top` best
        want |= {decode(reference, t): float(row[t]) for t in row.topk(top).indices.tolist()}
        assert lp.top_logprobs[p] == pytest.approx(want, abs=ATOL), p
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets


def test_openai_echo_logprobs_cover_the_prompt_then_the_completion(
    oai: openai.OpenAI, reference: Reference
) -> None:
    ids = ids_of(reference, PROMPTS[0])
    out = oai.completions.create(
        model="a4", prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0, echo=True, logprobs=2
    )
    choice = choice_of(out)
    assert choice.text == PROMPTS[0] + reference.text("a4", PROMPTS[0], MAX_NEW)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + MAX_NEW
    assert_echoed_prompt(lp, reference, "a4", ids, 2)
    generated = reference.token_ids("a4", ids, MAX_NEW)
    assert lp.tokens[len(ids) :] == [decode(reference, t) for t in generated]
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[len(ids) :])


def choice_of(out):
    [choice] = out.choices
    return choice


def test_openai_echo_with_max_tokens_0_scores_the_prompts_alone(
    oai: openai.OpenAI, reference: Reference
) -> None:
    """lm-eval's loglikelihood request: several prompts, echo, logprobs, nothing generated."""
    out = oai.completions.create(model="b8", prompt=list(PROMPTS[:2]), max_tokens=0, echo=True, logprobs=1)
    assert [c.text for c in out.choices] == list(PROMPTS[:2])
    for choice, prompt in zip(out.choices, PROMPTS[:2], strict=True):
        ids = ids_of(reference, prompt)
        assert len(choice.logprobs.tokens) == len(ids) and choice.finish_reason == "length"
        assert_echoed_prompt(choice.logprobs, reference, "b8", ids, 1)
    base = oai.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=0)
    assert_echoed_prompt(choice_of(base).logprobs, reference, None, ids_of(reference, PROMPTS[2]), 0)
    with pytest.raises(openai.BadRequestError) as no_echo:
        oai.completions.create(model="b8", prompt=PROMPTS[0], max_tokens=0)
    assert no_echo.value.param == "max_tokens"


def assert_vllm_prompt_logprobs(
    entries: list, reference: Reference, adapter: str | None, ids: tuple[int, ...], top: int
) -> None:
    """vLLM's shape: null first, then token id (string) -> {logprob, rank, decoded_token}, the prompt token first."""
    expected = reference.prompt_logprobs(adapter, ids)
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        row, token = expected[p - 1], ids[p]
        first_key, first = next(iter(entries[p].items()))
        assert first_key == str(token) and first["decoded_token"] == decode(reference, token)
        assert first["logprob"] == pytest.approx(float(row[token]), abs=ATOL)
        assert first["rank"] == int((row >= row[token]).sum())
        best = row.topk(top).indices.tolist()
        assert set(entries[p]) == {str(token), *map(str, best)}
        for rank, t in enumerate(best, start=1):
            if t != token:
                assert entries[p][str(t)] == {
                    "logprob": pytest.approx(float(row[t]), abs=ATOL),
                    "rank": rank,
                    "decoded_token": decode(reference, t),
                }


def test_openai_prompt_logprobs_extension_on_completions(oai: openai.OpenAI, reference: Reference) -> None:
    out = oai.completions.create(
        model="c16",
        prompt=PROMPTS[1],
        max_tokens=MAX_NEW,
        temperature=0,
        n=2,
        extra_body={"prompt_logprobs": 2},
    )
    ids = ids_of(reference, PROMPTS[1])
    assert len(out.choices) == 2
    for choice in out.choices:  # each choice carries its prompt's scoring (computed once)
        assert choice.text == reference.text("c16", PROMPTS[1], MAX_NEW)
        assert choice.logprobs is None
        assert_vllm_prompt_logprobs(choice.model_extra["prompt_logprobs"], reference, "c16", ids, 2)


def test_openai_prompt_logprobs_extension_on_chat(oai: openai.OpenAI, reference: Reference) -> None:
    out = oai.chat.completions.create(
        model="a4", messages=CHAT, max_tokens=MAX_NEW, temperature=0, extra_body={"prompt_logprobs": 1}
    )
    rendered = reference.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tuple(reference.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert out.choices[0].message.content == reference.chat_text("a4", CHAT, MAX_NEW)
    assert_vllm_prompt_logprobs(
        out.model_extra["prompt_logprobs"], reference, "a4", ids, 1
    )  # vLLM: top level


def test_openai_streams_echo_logprobs_but_refuse_prompt_logprobs(
    oai: openai.OpenAI, reference: Reference
) -> None:
    ids = ids_of(reference, PROMPTS[2])
    chunks = list(
        oai.completions.create(
            model="a4",
            prompt=PROMPTS[2],
            max_tokens=MAX_NEW,
            temperature=0,
            echo=True,
            logprobs=1,
            stream=True,
        )
    )
    first = chunks[0].choices[0]  # vLLM: the prompt comes with the first token
    assert first.text.startswith(PROMPTS[2])
    assert len(first.logprobs.tokens) == len(ids) + 1
    assert_echoed_prompt(first.logprobs, reference, "a4", ids, 1)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == PROMPTS[2] + reference.text("a4", PROMPTS[2], MAX_NEW)
    scoring = list(
        oai.completions.create(
            model="a4", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1, stream=True
        )
    )
    [only] = [c.choices[0] for c in scoring if c.choices]  # the prompt alone, then the end
    assert only.text == PROMPTS[2] and only.finish_reason == "length"
    assert len(only.logprobs.tokens) == len(ids)
    assert_echoed_prompt(only.logprobs, reference, "a4", ids, 1)
    for create in (oai.completions.create, oai.chat.completions.create):
        body = {"prompt": PROMPTS[2]} if create == oai.completions.create else {"messages": CHAT}
        with pytest.raises(openai.BadRequestError) as refused:
            list(create(model="a4", **body, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}))
        assert refused.value.param == "prompt_logprobs"


def test_tgi_client_decoder_input_details_returns_the_prefill(
    tgi: text_generation.Client, reference: Reference
) -> None:
    ids = ids_of(reference, PROMPTS[1])
    out = tgi.generate(PROMPTS[1], max_new_tokens=MAX_NEW, decoder_input_details=True)
    assert out.generated_text == reference.text(None, PROMPTS[1], MAX_NEW)
    prefill = out.details.prefill
    expected = reference.prompt_logprobs(None, ids)
    assert [t.id for t in prefill] == list(ids) and [t.text for t in prefill] == [
        decode(reference, t) for t in ids
    ]
    assert prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx(
        [float(expected[p - 1][ids[p]]) for p in range(1, len(ids))], abs=ATOL
    )
    assert tgi.generate(PROMPTS[1], max_new_tokens=MAX_NEW).details.prefill == []


def test_inference_client_decoder_input_details_with_an_adapter(
    hf: InferenceClient, reference: Reference
) -> None:
    ids = ids_of(reference, PROMPTS[0])
    out = hf.text_generation(
        PROMPTS[0],
        max_new_tokens=MAX_NEW,
        details=True,
        decoder_input_details=True,
        adapter_id="b8",
        top_n_tokens=2,
    )
    assert out.generated_text == reference.text("b8", PROMPTS[0], MAX_NEW)
    expected = reference.prompt_logprobs("b8", ids)
    prefill = out.details.prefill
    assert [t.id for t in prefill] == list(ids) and prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx(
        [float(expected[p - 1][ids[p]]) for p in range(1, len(ids))], abs=ATOL
    )
    assert len(out.details.top_tokens) == MAX_NEW and all(len(t) == 2 for t in out.details.top_tokens)
    with pytest.raises(ValidationError, match="decoder_input_details"):
        list(
            hf.text_generation(
                PROMPTS[0], max_new_tokens=2, details=True, decoder_input_details=True, stream=True
            )
        )


def test_tgi_stream_with_decoder_input_details_is_422(live_server: LiveServer) -> None:
    body = {"inputs": PROMPTS[0], "parameters": {"decoder_input_details": True, "max_new_tokens": 2}}
    for path in ("/generate_stream", "/"):
        status, _, out = call("POST", live_server.url + path, {**body, "stream": True})
        assert status == 422 and out["error_type"] == "validation", out
        assert "decoder_input_details" in out["error"]


def test_prompt_logprobs_bounds_are_400(live_server: LiveServer) -> None:
    url = f"{live_server.url}/v1/completions"
    for value in (-1, 21, "x"):
        status, _, out = call("POST", url, {"prompt": PROMPTS[0], "prompt_logprobs": value})
        assert status == 400 and out["error"]["param"] == "prompt_logprobs", out
    status, _, out = call("POST", url, {"prompt": PROMPTS[0], "prompt_logprobs": 0, "max_tokens": 1})
    assert status == 200, out
    entries = out["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and all(len(e) == 1 for e in entries[1:])  # only the prompt's own token


def test_token_texts_decode_as_the_tokenizer_does(reference: Reference) -> None:
    texts = TokenTexts(reference.tokenizer)
    texts.add(range(0, 400, 2))  # batched; the odd ids are decoded one at a time on demand
    assert [texts([t]) for t in range(400)] == [reference.tokenizer.decode([t]) for t in range(400)]
    assert texts([7, 8, 9]) == reference.tokenizer.decode([7, 8, 9])
