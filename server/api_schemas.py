"""Request bodies of the HTTP API as pydantic models: validated once at the edge (DESIGN.md §4).

Field names and limits follow TGI (`/generate`), OpenAI (`/v1/completions`,
`/v1/chat/completions`) and vLLM (`/v1/load_lora_adapter`), so existing clients work unchanged.
Unknown fields are ignored, as TGI and vLLM do; fields we cannot honour are refused with 422
by the routes rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # TGI's default `max_stop_sequences`
MAX_TOP_N_TOKENS = 5  # TGI's default `max_top_n_tokens`, also OpenAI completions' logprobs limit
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI chat's `top_logprobs` limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- TGI ---------------------------------------------------------------------------------------


class TGIParameters(_Body):
    """`parameters` of a TGI generate request (what `InferenceClient.text_generation` sends)."""

    adapter_id: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    return_full_text: bool | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] = Field(default_factory=list)
    temperature: Annotated[float, Field(gt=0.0)] | None = None
    top_k: Annotated[int, Field(gt=0)] | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None
    typical_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    watermark: bool = False


class TGIGenerateRequest(_Body):
    """Body of `POST /generate`, `/generate_stream` and the compat route `POST /` (with `stream`)."""

    inputs: Annotated[str, Field(min_length=1)]
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


# --- OpenAI ------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAISampling(_Body):
    """Fields shared by completions and chat, with vLLM's extra sampling knobs."""

    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_OpenAISampling):
    """Body of `POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None


class ChatContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Annotated[str, Field(min_length=1)]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    """Body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM extension


# --- adapter admin (vLLM-compatible names plus ours) -------------------------------------------


class LoadLoraAdapterRequest(_Body):
    """Body of `POST /v1/load_lora_adapter`."""

    lora_name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")]
    lora_path: Annotated[str, Field(min_length=1)]
    revision: str | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    aliases: list[str] = Field(default_factory=list)
    pinned: bool = False
    token: str | None = Field(
        default=None, repr=False
    )  # for a private hf:// or https:// source; never stored


class UnloadLoraAdapterRequest(_Body):
    """Body of `POST /v1/unload_lora_adapter`."""

    lora_name: Annotated[str, Field(min_length=1)]
