"""What a request may carry to an engine, and the most it can cost.

``parse`` decodes a body into its endpoint's strict schema (gateway/schemas.py) and checks what a
schema cannot say (prompt lists, structured-output limits, media URLs). ``plan`` then bounds what the
request can consume once its deployment is known, so that the limiter reserves an upper bound no
answer can exceed:

- prompt tokens: every prompt of a list, text by its UTF-8 bytes (no tokenizer makes more tokens than
  bytes, plus a few special tokens), token ids by their count; a chat prompt by the size of the whole
  body plus what a chat template may add (``GATEWAY_CHAT_TEMPLATE_TOKENS``) and a fixed amount per
  media part; each prompt at most the deployment's context length;
- completion tokens: prompts × max(n, best_of) × the larger of ``max_tokens`` and
  ``max_completion_tokens`` (or ``GATEWAY_DEFAULT_MAX_TOKENS``, forwarded explicitly), at least
  ``min_tokens``, each at most the context length. The department's per-request cap bounds this total.

``encode`` writes what goes upstream: only schema fields, never the redirection fields, with usage
asked for in every streamed chunk, the department's vLLM priority and its prefix-cache salt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec
from django.conf import settings
from msgspec import UNSET

from gateway import schemas
from gateway.directory import Route
from gateway.errors import GatewayError

ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
MAX_PATTERN = 4096  # characters of a regular expression
MAX_WHITESPACE_PATTERN = 256
SPECIAL_TOKENS = 8  # BOS/EOS and the like a tokenizer may add to one prompt
PROMPT_SHAPE = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<name>[^`]+)`")


def refuse(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, "invalid_request", param=param)


@dataclass
class Shaped:
    """A validated request, with what admission and accounting need to know about it."""

    request: Any  # the endpoint's schema struct
    endpoint: str
    model: str
    stream: bool
    wants_usage: bool  # the client asked for stream_options.include_usage
    wants_continuous_usage: bool
    prompt_bounds: list[int]  # the most tokens each prompt can be
    media_parts: int
    prefix: str  # the start of the prompt, for replica affinity
    body_bytes: int
    sequences: int = 0  # completions generated: prompts × max(n, best_of); 0 for embeddings
    max_tokens: int | None = None  # per sequence, as forwarded
    reserve: int = 0  # the upper bound of prompt + completion tokens, set by plan()

    @property
    def prompt_chars(self) -> int:
        return sum(self.prompt_bounds)


# -- parse -----------------------------------------------------------------------------------------
def _param(exc: msgspec.ValidationError) -> str:
    """The JSON path of the field msgspec complained about, as ``messages[0].content``."""
    text = str(exc)
    match = _PATH.search(text)
    path = match.group("path").lstrip(".") if match else ""
    named = _FIELD.search(text)
    if named and ("unknown field" in text or "missing required field" in text):
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return path or "body"


def _message(exc: msgspec.ValidationError, param: str, endpoint: str) -> str:
    text = _PATH.sub("", str(exc))
    if "unknown field" in text:
        return f"'{param}' is not accepted by this gateway on /v1/{endpoint}."
    if "missing required field" in text:
        return f"'{param}' is required."
    if param == "body":
        return "The request body must be a JSON object."
    if "matching regex" in text:
        return f"'{param}' must not contain control characters."
    return f"'{param}': {text}."


def _bound_text(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass")) + SPECIAL_TOKENS


def _prompt_bounds(value: Any, param: str) -> list[int]:
    if isinstance(value, str):
        return [_bound_text(value)]
    if not value:
        raise refuse(f"'{param}' {PROMPT_SHAPE}; it is empty.", param)
    first = value[0]
    if isinstance(first, str):
        if not all(isinstance(item, str) for item in value):
            raise refuse(f"'{param}' {PROMPT_SHAPE}.", param)
        bounds = [_bound_text(item) for item in value]
    elif isinstance(first, list):
        bounds = []
        for item in value:
            if not isinstance(item, list) or not item or not _token_ids(item):
                raise refuse(f"'{param}' {PROMPT_SHAPE}.", param)
            bounds.append(len(item))
    elif _token_ids(value):
        bounds = [len(value)]
    else:
        raise refuse(f"'{param}' {PROMPT_SHAPE}.", param)
    if len(bounds) > settings.GATEWAY_MAX_PROMPTS:
        raise refuse(f"'{param}' has {len(bounds)} prompts; at most {settings.GATEWAY_MAX_PROMPTS} are allowed.",
                     param)  # fmt: skip
    return bounds


def _token_ids(items: list[Any]) -> bool:
    return all(type(item) is int and 0 <= item < 2**31 for item in items)


def _check_pattern(value: str, param: str, limit: int = MAX_PATTERN) -> None:
    if len(value) > limit:
        raise refuse(f"'{param}' must be a regular expression of at most {limit} characters.", param)
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise refuse(f"'{param}' is not a valid regular expression: {exc}.", param) from None


def _check_size(value: Any, param: str) -> None:
    size = len(value) if isinstance(value, str) else len(schemas.ENCODER.encode(value))
    if size > settings.GATEWAY_MAX_SPEC_BYTES:
        raise refuse(f"'{param}' is {size} bytes; at most {settings.GATEWAY_MAX_SPEC_BYTES} are allowed.", param)


_GUIDED = ("json", "regex", "choice", "grammar", "whitespace_pattern")


def _check_structured(request: Any) -> None:
    given = {name: value for name in _GUIDED if (value := getattr(request, f"guided_{name}")) is not UNSET}
    if given:
        if request.structured_outputs not in (UNSET, None):
            raise refuse("Give either 'structured_outputs' or the older 'guided_*' fields, not both.",
                         f"guided_{next(iter(given))}")  # fmt: skip
        for name in given:
            setattr(request, f"guided_{name}", UNSET)
        request.structured_outputs = schemas.StructuredOutputs(**given)
        prefix = "guided_"
    else:
        prefix = "structured_outputs."
    spec = request.structured_outputs
    if spec not in (UNSET, None):
        for name in ("json", "grammar", "choice"):
            if getattr(spec, name) is not UNSET:
                _check_size(getattr(spec, name), prefix + name)
        if spec.regex is not UNSET:
            _check_pattern(spec.regex, prefix + "regex")
        if spec.whitespace_pattern is not UNSET:
            _check_pattern(spec.whitespace_pattern, prefix + "whitespace_pattern", MAX_WHITESPACE_PATTERN)
    response_format = request.response_format
    if isinstance(response_format, schemas.JsonSchemaFormat) and response_format.json_schema.schema_ is not UNSET:
        _check_size(response_format.json_schema.schema_, "response_format.json_schema.schema")


def _check_messages(request: schemas.ChatRequest) -> tuple[int, str]:
    """Media parts (data: URLs only: never file: or an address the engine would fetch) and the
    prompt's start for replica affinity."""
    media, prefix = 0, []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, str):
            prefix.append(content)
            continue
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, schemas.TextPart):
                prefix.append(part.text)
            elif isinstance(part, schemas.MEDIA_PARTS):
                media += 1
                url = getattr(getattr(part, str(part.__struct_config__.tag), None), "url", None)
                if url is not None and not url.startswith("data:"):
                    param = f"messages[{i}].content[{j}]"
                    raise refuse(f"'{param}': media must be sent inline as a data: URL; the engine fetches no "
                                 "addresses.", param)  # fmt: skip
    kwargs = request.chat_template_kwargs
    if kwargs not in (UNSET, None):
        for name, value in kwargs.items():
            if name == "chat_template":
                raise refuse("'chat_template_kwargs.chat_template' is not accepted by this gateway.",
                             "chat_template_kwargs")  # fmt: skip
            if not isinstance(value, str | bool | int | float | None) or len(name) > 64:
                raise refuse(f"'chat_template_kwargs.{name[:64]}' must be a string, number or boolean.",
                             "chat_template_kwargs")  # fmt: skip
    return media, "\n".join(prefix)[:512]


def parse(endpoint: str, raw: bytes) -> Shaped:
    """Decode and check a request body; raises GatewayError(400) naming the field at fault."""
    try:
        request = schemas.DECODERS[endpoint].decode(raw)
    except msgspec.ValidationError as exc:
        param = _param(exc)
        raise refuse(_message(exc, param, endpoint), param) from None
    except msgspec.DecodeError:
        raise GatewayError(400, "The request body is not valid JSON.", "invalid_json") from None
    if getattr(request, "cache_salt", UNSET) is not UNSET:
        raise refuse("'cache_salt' is set by the gateway.", "cache_salt")
    for name in schemas.NOT_FORWARDED:
        if getattr(request, name, UNSET) is not UNSET:
            setattr(request, name, UNSET)
    media, prefix = 0, ""
    if endpoint == "chat/completions":
        media, prefix = _check_messages(request)
        bounds = [len(raw) + settings.GATEWAY_CHAT_TEMPLATE_TOKENS + media * settings.GATEWAY_MEDIA_PART_TOKENS]
    elif endpoint == "completions":
        bounds = _prompt_bounds(request.prompt, "prompt")
        prefix = request.prompt[:512] if isinstance(request.prompt, str) else ""
    else:
        bounds = _prompt_bounds(request.input, "input")
    stream = wants_usage = wants_continuous = False
    if endpoint != "embeddings":
        _check_structured(request)
        if request.n is not UNSET and request.n > settings.GATEWAY_MAX_N:
            raise refuse(f"'n' is {request.n}; at most {settings.GATEWAY_MAX_N} is allowed.", "n")
        stream = request.stream is True
        options = request.stream_options
        if stream and options not in (UNSET, None):
            wants_usage = options.include_usage is True
            wants_continuous = options.continuous_usage_stats is True
    return Shaped(request, endpoint, request.model, stream, wants_usage, wants_continuous, bounds, media, prefix,
                  len(raw))  # fmt: skip


# -- plan ------------------------------------------------------------------------------------------
def plan(shaped: Shaped, route: Route, cap: int | None) -> int:
    """Fix the most tokens the request may generate and return the reservation (an upper bound of the
    prompt and completion tokens it can be billed). ``cap``: the department's (or key's) most
    completion tokens per request."""
    request, context = shaped.request, route.context
    if shaped.media_parts and not route.media:
        raise refuse(f"'{route.name}' does not accept images, audio or video.", "messages")
    prompts = [min(bound, context) if context else bound for bound in shaped.prompt_bounds]
    if shaped.endpoint == "embeddings":
        shaped.reserve = sum(prompts)
        return shaped.reserve
    width = max(request.n or 1, getattr(request, "best_of", None) or 1)
    shaped.sequences = sequences = len(prompts) * width
    named = {name: getattr(request, name, None) for name in ("max_tokens", "max_completion_tokens")}
    named = {name: value for name, value in named.items() if value not in (None, UNSET)}
    least = request.min_tokens if request.min_tokens is not UNSET else 0
    if named:
        field, most = max(named.items(), key=lambda item: item[1])
        if cap is not None and most * sequences > cap:
            raise refuse(f"This request may generate {most * sequences} tokens ({sequences} completions × "
                         f"'{field}' {most}); your department allows at most {cap} per request.", field)  # fmt: skip
        if least > most:
            raise refuse(f"'min_tokens' ({least}) is more than '{field}' ({most}).", "min_tokens")
    else:
        most = max(settings.GATEWAY_DEFAULT_MAX_TOKENS, least)
        if cap is not None:
            most = min(most, cap // sequences)
            if most < 1 or least > most:
                raise refuse(f"This request asks for {sequences} completions (prompts × n) of at least "
                             f"{max(1, least)} tokens; your department allows {cap} tokens per request.",
                             "n" if not least else "min_tokens")  # fmt: skip
    shaped.max_tokens = most
    per_sequence = min(most, context) if context else most
    shaped.reserve = sum(prompts) + sequences * per_sequence
    return shaped.reserve


def encode(shaped: Shaped, priority: int | None, salt: str | None) -> bytes:
    """The body sent upstream."""
    request = shaped.request
    if shaped.endpoint != "embeddings":
        request.max_tokens = shaped.max_tokens
        if shaped.endpoint == "chat/completions":
            request.max_completion_tokens = UNSET
        # Usage in every chunk: the bill stays right when the client leaves mid-stream.
        request.stream_options = (
            schemas.StreamOptions(include_usage=True, continuous_usage_stats=True) if shaped.stream else UNSET
        )
        request.priority = UNSET if priority is None else priority
        request.cache_salt = UNSET if salt is None else salt
    return schemas.ENCODER.encode(request)
