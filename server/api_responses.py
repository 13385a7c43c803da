"""Response shapes of the HTTP API as pydantic models, for /openapi.json (and the tests that
validate real responses against it). Fields that are always present are required; the
`extra="allow"` ones leave room for what a route adds (vLLM-style extensions, /info extras)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors ------------------------------------------------------------------------------------


class TGIError(BaseModel):
    """TGI and admin routes. On TGI's generation routes `error_type` is validation, generation,
    overloaded or incomplete_generation (what TGI clients parse); admin routes keep their own."""

    error: str
    error_type: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# --- TGI ---------------------------------------------------------------------------------------


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class TGIPrefillToken(BaseModel):
    """A prompt token in `details.prefill` (`decoder_input_details`); the first one's logprob is null."""

    id: int
    text: str
    logprob: float | None


class TGIBestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[TGIPrefillToken]
    tokens: list[TGIToken]
    top_tokens: list[list[TGIToken]] | None


class TGIDetails(TGIBestOfSequence):
    generated_text: str | None = None  # type: ignore[assignment]
    best_of_sequences: list[TGIBestOfSequence] | None


class TGIGenerateResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class TGIStreamEvent(BaseModel):
    """One `data:` event of `/generate_stream` (no `[DONE]`); an error event is a `TGIError`."""

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None
    generated_text: str | None
    details: TGIStreamDetails | None


class TGIInfo(_Open):
    model_id: str
    max_concurrent_requests: int | None
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    version: str
    sha: str | None
    adapters: list[str]


class TokenizedToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


# --- OpenAI ------------------------------------------------------------------------------------


class _Envelope(_Open):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`: one token at one prompt position (`rank` 1 = the most likely)."""

    logprob: float
    rank: int
    decoded_token: str


# Per prompt position (the first one null): token id (a string) -> its logprob, rank and text.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionLogprobs(BaseModel):
    """With `echo`, the prompt's tokens come first (the first one's logprob and top_logprobs null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension, with `prompt_logprobs`


class CompletionResponse(_Envelope):
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Envelope):
    """One `data:` event of a streamed completion; the stream ends with `data: [DONE]`."""

    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(_Open):
    role: str
    content: str | None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletionResponse(_Envelope):
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension, with `prompt_logprobs`


class ChatDelta(_Open):
    role: str
    content: str | None
    tool_calls: None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletionChunk(_Envelope):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Open):
    id: str
    object: str
    created: int
    owned_by: str
    root: str | None
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


# --- admin and probes ---------------------------------------------------------------------------


class AdapterOut(_Open):
    name: str
    source: str
    state: str


class AdapterList(BaseModel):
    """`data`: every adapter, or with `?since=` those changed since that revision."""

    object: str
    data: list[AdapterOut]
    instance: str = Field(description="This server process; a `since` naming another gets the full list.")
    revision: int = Field(description="Send `since=<instance>:<revision>` to get what changes after this.")
    full: bool = Field(description="`data` is every adapter (no `since`, or one that cannot be answered).")
    removed: list[str] = Field(description="With `since`: adapters unloaded since then.")
