"""Request bodies of the HTTP API as pydantic models: validated once at the edge (DESIGN.md §4).

Field names and limits follow TGI (`/generate`), OpenAI (`/v1/completions`,
`/v1/chat/completions`) and vLLM (`/v1/load_lora_adapter`), so existing clients work unchanged.
Unknown fields are ignored, as TGI and vLLM do; fields we cannot honour are declared with
`unsupported(...)` (marked `x-loraplex-unsupported` in /openapi.json) and refused by the routes
when set, rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # TGI's default `max_stop_sequences`
MAX_TOP_N_TOKENS = 5  # TGI's default `max_top_n_tokens`, also OpenAI completions' logprobs limit
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI chat's `top_logprobs` limit
MAX_BEST_OF = 8  # choices per request (`n`, `best_of`), each one a sequence in the batch
MAX_PROMPTS = 32  # prompts in one completions request
MAX_PROMPT_LOGPROBS = 20  # alternatives per prompt position (vLLM's default `--max-logprobs`)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- unsupported fields ------------------------------------------------------------------------

UNSUPPORTED = "x-loraplex-unsupported"  # the schema's mark on fields this server refuses


def unsupported(what: str) -> Any:
    """A field clients send that this server cannot honour: accepted as absent, refused when set."""
    return Field(
        default=None,
        description=f"Not supported: a request that sets it ({what}) is refused with 400/422 naming it.",
        json_schema_extra={UNSUPPORTED: True},
    )


def is_inert(value: Any) -> bool:
    """Values of an unsupported field that ask for nothing (what clients send by default)."""
    return value in (None, False, "", [], {}, "none", "auto") or value == {"type": "text"}


def unsupported_fields_set(body: BaseModel) -> list[str]:
    """Names of the unsupported fields `body` sets to something that is not inert."""
    return [
        name
        for name, info in type(body).model_fields.items()
        if isinstance(info.json_schema_extra, dict)
        and info.json_schema_extra.get(UNSUPPORTED)
        and not is_inert(getattr(body, name))
    ]


# --- TGI ---------------------------------------------------------------------------------------


class TGIParameters(_Body):
    """`parameters` of a TGI generate request (what `InferenceClient.text_generation` sends)."""

    adapter_id: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] | None = None
    decoder_input_details: bool | None = Field(
        default=False,
        description="With `details`: `details.prefill` lists the prompt's tokens with their logprobs "
        "(the first one null). Not with streams (422, as in TGI).",
    )
    details: bool | None = False
    do_sample: bool | None = False
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    grammar: dict[str, Any] | None = unsupported("guided decoding")
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    return_full_text: bool | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: Annotated[float, Field(gt=0.0)] | None = None
    top_k: Annotated[int, Field(gt=0)] | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None
    typical_p: Annotated[float, Field(gt=0.0, lt=1.0)] | None = unsupported("typical sampling")
    watermark: bool | None = unsupported("watermarking")


class TGIGenerateRequest(_Body):
    """Body of `POST /generate`, `/generate_stream` and the compat route `POST /` (with `stream`)."""

    inputs: Annotated[str, Field(min_length=1)]
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool | None = False


class TokenizeRequest(_Body):
    """Body of TGI's `POST /tokenize` (`parameters` is accepted for symmetry and unused)."""

    inputs: Annotated[str, Field(min_length=1)]
    parameters: dict[str, Any] | None = None


# --- OpenAI ------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage on every chunk


class _OpenAISampling(_Body):
    """Fields shared by completions and chat, with vLLM's extra sampling knobs. Every optional
    field accepts an explicit `null` (the OpenAI SDKs and TGI's client send them)."""

    model: str | None = Field(
        default=None,
        description="An adapter's served name or alias; absent, `tgi`, `dummy` or the base's name: the base.",
    )
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | list[float] | None = unsupported("logit biases")
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_PROMPT_LOGPROBS)] | None = Field(
        default=None,
        description="vLLM extension: per prompt position, the prompt token's logprob and rank and this many "
        "most likely tokens (`choices[i].prompt_logprobs` on completions, `prompt_logprobs` on chat). Not with streams.",
    )
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_OpenAISampling):
    """Body of `POST /v1/completions`."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=16,
        description="0 only with `echo`: the prompt alone, scored when `logprobs` is set (as in vLLM).",
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    echo: bool | None = Field(
        default=False, description="The prompt leads the text; with `logprobs`, its tokens lead the logprobs."
    )
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] | None = None
    suffix: str | None = unsupported("insertion")


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
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = unsupported("tool calling")
    tool_choice: str | dict[str, Any] | None = unsupported("tool calling")
    functions: list[dict[str, Any]] | None = unsupported("function calling")
    response_format: dict[str, Any] | None = unsupported("structured output other than text")
    add_generation_prompt: bool | None = True  # vLLM extension


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
    # callable at once without a key file entry (the operator's declaration; the file's wins)
    open: bool = False


class UnloadLoraAdapterRequest(_Body):
    """Body of `POST /v1/unload_lora_adapter`."""

    lora_name: Annotated[str, Field(min_length=1)]
