"""One strict schema per ``/v1`` endpoint: every field the gateway reads or forwards, with its JSON
type. msgspec decodes the body straight into these structs: a wrong type is refused, never coerced
(``"stream": "false"`` is a string, not a boolean), an unknown field is refused by name, and only the
fields listed here can reach an engine (the struct is what gets re-encoded and forwarded).

msgspec rather than pydantic: it is strict by default, decodes and validates in one pass from bytes
(a typical chat request in a few microseconds, ``bench/gateway.py`` ``validate_us``), and its errors
name the JSON path of the field at fault.

Identifiers the console records (``model``, ``user``) refuse control characters: a NUL in a model name
once poisoned the usage drain on PostgreSQL.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

# C0 and C1 control characters, DEL and lone surrogates: refused in anything the console records.
CONTROL = "\x00-\x1f\x7f-\x9f\ud800-\udfff"
Identifier = Annotated[str, Meta(min_length=1, max_length=256, pattern=f"^[^{CONTROL}]+$")]
Count = Annotated[int, Meta(ge=1, le=2**31 - 1)]
NonNegative = Annotated[int, Meta(ge=0, le=2**31 - 1)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Stop = str | Annotated[list[str], Meta(max_length=16)]


class Base(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


class StreamOptions(Base):
    include_usage: bool | UnsetType = UNSET
    continuous_usage_stats: bool | UnsetType = UNSET


class StructuredOutputs(Base):
    """vLLM's structured outputs (size and pattern limits are checked in admission.py)."""

    json: dict[str, Any] | str | UnsetType = UNSET
    regex: str | UnsetType = UNSET
    choice: Annotated[list[str], Meta(min_length=1, max_length=256)] | UnsetType = UNSET
    grammar: str | UnsetType = UNSET
    json_object: bool | UnsetType = UNSET
    whitespace_pattern: str | UnsetType = UNSET
    disable_any_whitespace: bool | UnsetType = UNSET
    disable_additional_properties: bool | UnsetType = UNSET


class JsonSchemaSpec(Base):
    name: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    schema_: dict[str, Any] | UnsetType = field(default=UNSET, name="schema")
    strict: bool | UnsetType | None = UNSET


class ResponseFormat(Base, tag_field="type"):
    pass


class TextFormat(ResponseFormat, tag="text"):
    pass


class JsonObjectFormat(ResponseFormat, tag="json_object"):
    pass


class JsonSchemaFormat(ResponseFormat, tag="json_schema"):
    json_schema: JsonSchemaSpec


class Sampling(Base):
    """Fields shared by chat and completions (OpenAI's and vLLM's sampling parameters)."""

    model: Identifier
    user: Identifier | UnsetType = UNSET
    stream: bool | UnsetType = UNSET
    stream_options: StreamOptions | UnsetType | None = UNSET
    n: Count | UnsetType = UNSET
    max_tokens: Count | UnsetType | None = UNSET
    min_tokens: NonNegative | UnsetType = UNSET
    temperature: Annotated[float, Meta(ge=0, le=100)] | UnsetType | None = UNSET
    top_p: Probability | UnsetType | None = UNSET
    top_k: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | UnsetType | None = UNSET
    min_p: Probability | UnsetType | None = UNSET
    frequency_penalty: Penalty | UnsetType | None = UNSET
    presence_penalty: Penalty | UnsetType | None = UNSET
    repetition_penalty: Annotated[float, Meta(gt=0, le=100)] | UnsetType | None = UNSET
    length_penalty: float | UnsetType = UNSET
    logit_bias: (
        Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=1024)] | UnsetType | None
    ) = UNSET
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | UnsetType | None = UNSET
    stop: Stop | UnsetType | None = UNSET
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] | UnsetType | None = UNSET
    ignore_eos: bool | UnsetType = UNSET
    include_stop_str_in_output: bool | UnsetType = UNSET
    skip_special_tokens: bool | UnsetType = UNSET
    spaces_between_special_tokens: bool | UnsetType = UNSET
    use_beam_search: bool | UnsetType = UNSET
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | UnsetType | None = UNSET
    prompt_logprobs: TopLogprobs | UnsetType | None = UNSET
    echo: bool | UnsetType = UNSET
    add_special_tokens: bool | UnsetType = UNSET
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | UnsetType | None = UNSET
    structured_outputs: StructuredOutputs | UnsetType | None = UNSET
    # Older vLLM spellings of structured outputs, forwarded as ``structured_outputs``.
    guided_json: dict[str, Any] | str | UnsetType = UNSET
    guided_regex: str | UnsetType = UNSET
    guided_choice: Annotated[list[str], Meta(min_length=1, max_length=256)] | UnsetType = UNSET
    guided_grammar: str | UnsetType = UNSET
    guided_whitespace_pattern: str | UnsetType = UNSET
    # Accepted and never forwarded: redirection fields of proxy SDKs, and what the gateway sets itself.
    api_base: str | UnsetType = UNSET
    base_url: str | UnsetType = UNSET
    priority: int | UnsetType = UNSET
    request_id: str | UnsetType = UNSET
    # OpenAI fields with no meaning here: accepted, not forwarded.
    store: bool | UnsetType | None = UNSET
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | UnsetType | None = UNSET
    service_tier: str | UnsetType | None = UNSET
    # Set by the gateway (per department, so one cannot time another's prompts in the prefix cache).
    cache_salt: str | UnsetType = UNSET


# -- chat ----------------------------------------------------------------------------------------
class Part(Base, tag_field="type"):
    pass


class TextPart(Part, tag="text"):
    text: str


class RefusalPart(Part, tag="refusal"):
    refusal: str


class MediaUrl(Base):
    url: str
    detail: Literal["auto", "low", "high"] | UnsetType = UNSET


class ImagePart(Part, tag="image_url"):
    image_url: MediaUrl


class AudioUrlPart(Part, tag="audio_url"):
    audio_url: MediaUrl


class VideoPart(Part, tag="video_url"):
    video_url: MediaUrl


class InputAudio(Base):
    data: str
    format: Literal["wav", "mp3"]


class InputAudioPart(Part, tag="input_audio"):
    input_audio: InputAudio


ContentPart = TextPart | RefusalPart | ImagePart | AudioUrlPart | VideoPart | InputAudioPart
MEDIA_PARTS = (ImagePart, AudioUrlPart, VideoPart, InputAudioPart)


class FunctionCall(Base):
    name: Identifier
    arguments: str


class ToolCall(Base):
    id: Annotated[str, Meta(max_length=256)]
    function: FunctionCall
    type: Literal["function"] = "function"


class FunctionDef(Base):
    name: Identifier
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET


class Tool(Base):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Base):
    name: Identifier


class ToolChoice(Base):
    type: Literal["function"]
    function: NamedFunction


class Message(Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | UnsetType | None = UNSET
    name: Identifier | UnsetType = UNSET
    tool_calls: Annotated[list[ToolCall], Meta(max_length=128)] | UnsetType | None = UNSET
    tool_call_id: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET
    reasoning_content: str | UnsetType | None = UNSET


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Count | UnsetType | None = UNSET
    logprobs: bool | UnsetType | None = UNSET
    top_logprobs: TopLogprobs | UnsetType | None = UNSET
    tools: Annotated[list[Tool], Meta(max_length=128)] | UnsetType | None = UNSET
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | UnsetType | None = UNSET
    parallel_tool_calls: bool | UnsetType | None = UNSET
    add_generation_prompt: bool | UnsetType = UNSET
    continue_final_message: bool | UnsetType = UNSET
    chat_template_kwargs: Annotated[dict[str, Any], Meta(max_length=32)] | UnsetType | None = UNSET
    reasoning_effort: Literal["low", "medium", "high"] | UnsetType | None = UNSET


# -- completions and embeddings ------------------------------------------------------------------
# A prompt or input is a string, a list of strings, a list of token ids or a list of such lists;
# msgspec allows one array type in a union, so the list's items are checked in admission.py.
Prompt = str | list[Any]


class CompletionRequest(Sampling, kw_only=True):
    prompt: Prompt
    best_of: Count | UnsetType | None = UNSET
    logprobs: TopLogprobs | UnsetType | None = UNSET
    suffix: str | UnsetType | None = UNSET


class EmbeddingRequest(Base):
    model: Identifier
    input: Prompt
    user: Identifier | UnsetType = UNSET
    encoding_format: Literal["float", "base64"] | UnsetType = UNSET
    dimensions: Count | UnsetType | None = UNSET
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | UnsetType | None = UNSET
    add_special_tokens: bool | UnsetType = UNSET
    # Accepted, never forwarded (as above).
    api_base: str | UnsetType = UNSET
    base_url: str | UnsetType = UNSET
    priority: int | UnsetType = UNSET
    request_id: str | UnsetType = UNSET


# Accepted from clients but never forwarded (redirection fields of proxy SDKs, OpenAI-only fields).
NOT_FORWARDED = ("api_base", "base_url", "priority", "request_id", "store", "metadata", "service_tier")
SCHEMAS: dict[str, type[Base]] = {
    "chat/completions": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}
DECODERS = {endpoint: msgspec.json.Decoder(schema) for endpoint, schema in SCHEMAS.items()}
ENCODER = msgspec.json.Encoder()
