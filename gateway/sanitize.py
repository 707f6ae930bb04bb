"""What a request may carry to an engine. Only the allowlisted endpoints reach one (vLLM's
``--api-key`` leaves ``/tokenize``, ``/pause``, ``/invocations`` and others open); fields that have
been attack vectors are dropped (redirection: ``api_base``/``base_url``) or refused (``prompt_embeds``,
``chat_template``, malformed ``json_schema``/regex), ``n`` and ``max_tokens`` are capped."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError

# path → (method, endpoint name used in usage records)
ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
DROPPED = ("api_base", "base_url", "api_key", "user_api_key", "priority", "request_id")
REFUSED = ("prompt_embeds", "chat_template", "mm_processor_kwargs", "kv_transfer_params")
MAX_PATTERN = 4096


@dataclass
class Shaped:
    """The request as it will be sent upstream, with what admission needs to know about it."""

    body: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool  # the client asked for stream_options.include_usage
    wants_continuous_usage: bool
    max_tokens: int | None
    prompt_chars: int
    prefix: str  # the start of the prompt, for replica affinity


def _refuse(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request", param=param)


def _text_of(value: Any) -> str:
    """The text of a prompt, messages' contents, or embeddings input (for estimates and affinity)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for item in value:
            if isinstance(item, dict):
                parts.append(_text_of(item.get("content", item.get("text", ""))))
            else:
                parts.append(_text_of(item))
        return "\n".join(parts)
    return ""


def _check_pattern(value: Any, param: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_PATTERN:
        raise _refuse(f"'{param}' must be a regular expression of at most {MAX_PATTERN} characters.", param)
    try:
        re.compile(value)
    except re.error as exc:
        raise _refuse(f"'{param}' is not a valid regular expression: {exc}.", param) from None


def _check_structured(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise _refuse("'response_format' must be an object.", "response_format")
        if response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise _refuse("'response_format.json_schema.schema' must be a JSON object.", "response_format")
    for name in ("guided_regex",):
        if name in body:
            _check_pattern(body[name], name)
    if "guided_json" in body and not isinstance(body["guided_json"], dict | str):
        raise _refuse("'guided_json' must be a JSON schema object.", "guided_json")
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise _refuse("'structured_outputs' must be an object.", "structured_outputs")
        if "regex" in structured:
            _check_pattern(structured["regex"], "structured_outputs.regex")
        if "json" in structured and not isinstance(structured["json"], dict | str):
            raise _refuse("'structured_outputs.json' must be a JSON schema object.", "structured_outputs")


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(f"'{name}' must be a positive integer.", name)
    return value


def shape(endpoint: str, body: Any, max_tokens_cap: int | None, max_n: int) -> Shaped:
    """Check and rewrite a request body; raises GatewayError(400) naming the field at fault."""
    if not isinstance(body, dict):
        raise _refuse("The request body must be a JSON object.", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _refuse("'model' is required.", "model")
    for name in REFUSED:
        if name in body:
            raise _refuse(f"'{name}' is not accepted by this gateway.", name)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or "chat_template" in kwargs):
        raise _refuse("'chat_template_kwargs.chat_template' is not accepted by this gateway.", "chat_template_kwargs")
    for name in DROPPED:
        body.pop(name, None)
    _check_structured(body)

    n = _positive_int(body, "n")
    if n is not None and n > max_n:
        raise _refuse(f"'n' is {n}; at most {max_n} is allowed.", "n")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _positive_int(body, name)
        if value is not None:
            if max_tokens_cap is not None and value > max_tokens_cap:
                raise _refuse(f"'{name}' is {value}; your department allows at most {max_tokens_cap}.", name)
            max_tokens = value if max_tokens is None else min(max_tokens, value)
    if max_tokens is None and max_tokens_cap is not None and endpoint != "embeddings":
        body["max_tokens"] = max_tokens = max_tokens_cap

    if endpoint == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _refuse("'messages' must be a non-empty list.", "messages")
        text = _text_of(messages)
    elif endpoint == "completions":
        if "prompt" not in body:
            raise _refuse("'prompt' is required.", "prompt")
        text = _text_of(body["prompt"])
    else:
        if "input" not in body:
            raise _refuse("'input' is required.", "input")
        text = _text_of(body["input"])

    stream = bool(body.get("stream")) and endpoint != "embeddings"
    wants_usage = wants_continuous = False
    if stream:
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        wants_usage = bool(options.get("include_usage"))
        wants_continuous = bool(options.get("continuous_usage_stats"))
        # Usage in every chunk: the bill stays right when the client leaves mid-stream.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    else:
        body.pop("stream_options", None)
    return Shaped(body, model, stream, wants_usage, wants_continuous, max_tokens, len(text), text[:512])
