"""The strict schemas and the reservation bound (gateway/admission.py), without a server: every bad
input named in the issue, and property tests over request shapes (hypothesis) against a worst-case
engine that bills the most tokens the forwarded request allows."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import admission
from gateway.directory import Route
from gateway.errors import GatewayError

HELLO = [{"role": "user", "content": "hi"}]
PLAIN = Route(1, "tiny", False, (), 0)


def parse(body: Any, endpoint: str = "chat/completions") -> admission.Shaped:
    return admission.parse(endpoint, orjson.dumps(body))


def refusal(body: Any, endpoint: str = "chat/completions", route: Route = PLAIN, cap: int | None = None) -> Any:
    with pytest.raises(GatewayError) as error:
        admission.plan(parse(body, endpoint), route, cap)
    assert error.value.status == 400
    return error.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": HELLO, "stream": "false"}, "stream"),
        ({"model": "tiny", "messages": HELLO, "n": "2"}, "n"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": 2.5}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": True}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "temperature": "0.5"}, "temperature"),
        ({"model": "tiny\x00", "messages": HELLO}, "model"),
        ({"model": "ti\u0085ny", "messages": HELLO}, "model"),
        ({"model": "tiny", "messages": HELLO, "user": "bob\x1b[31m"}, "user"),
        ({"model": "tiny", "messages": [{"role": "root", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "tiny", "messages": HELLO, "prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"model": "tiny", "messages": HELLO, "chat_template": "{{ 7*7 }}"}, "chat_template"),
        ({"model": "tiny", "messages": HELLO, "chat_template_kwargs": {"chat_template": "x"}}, "chat_template_kwargs"),
        ({"model": "tiny", "messages": HELLO, "chat_template_kwargs": {"tools": [{"x": 1}]}}, "chat_template_kwargs"),
        ({"model": "tiny", "messages": HELLO, "mm_processor_kwargs": {}}, "mm_processor_kwargs"),
        ({"model": "tiny", "messages": HELLO, "kv_transfer_params": {}}, "kv_transfer_params"),
        ({"model": "tiny", "messages": HELLO, "cache_salt": "guess"}, "cache_salt"),
        ({"model": "tiny", "messages": HELLO, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "tiny", "messages": HELLO, "logprobs": 3}, "logprobs"),
        ({"model": "tiny", "messages": HELLO, "guided_regex": "a" * 5000}, "guided_regex"),
        ({"model": "tiny", "messages": HELLO, "structured_outputs": {"regex": "(x"}}, "structured_outputs.regex"),
        ({"model": "tiny", "messages": HELLO, "structured_outputs": {"whitespace_pattern": "[" }},
         "structured_outputs.whitespace_pattern"),
        ({"model": "tiny", "messages": HELLO, "structured_outputs": {"grammar": "x" * 70000}},
         "structured_outputs.grammar"),
        ({"model": "tiny", "messages": HELLO, "guided_json": {"properties": {"a" * 70000: {}}}}, "guided_json"),
        ({"model": "tiny", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"description": "y" * 70000}}}}, "response_format.json_schema.schema"),
        ({"model": "tiny", "messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "tiny", "messages": HELLO, "guided_regex": "a", "structured_outputs": {"regex": "b"}},
         "guided_regex"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, "messages[0].content[0]"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]}, "messages[0].content[0]"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
         "messages[0].content[0].type"),
    ],
)  # fmt: skip
def test_wrong_types_and_refused_fields_name_the_field(body: dict, param: str) -> None:
    assert refusal(body).param == param


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [([], "empty"), (["a", 1], "mixed"), ([1, True], "a boolean is no token id"), ([1, -1], "negative id"),
     ([[1], []], "empty token list"), ([[1], "a"], "mixed lists"), ([1.5], "float"), ({"a": 1}, "object")],
)  # fmt: skip
def test_prompt_shapes_are_checked(prompt: Any, reason: str) -> None:
    assert refusal({"model": "tiny", "prompt": prompt}, "completions").param == "prompt", reason


def test_too_many_prompts(settings: Any) -> None:
    settings.GATEWAY_MAX_PROMPTS = 4
    error = refusal({"model": "tiny", "prompt": ["a"] * 5}, "completions")
    assert error.param == "prompt" and "at most 4" in error.message


def test_invalid_utf8_and_bad_json_are_refused() -> None:
    for raw in (b'{"model": "tiny\xff", "messages": []}', b"{not json", b""):
        with pytest.raises(GatewayError) as error:
            admission.parse("chat/completions", raw)
        assert error.value.status == 400 and error.value.code in ("invalid_json", "invalid_request"), raw


def test_media_only_on_deployments_that_take_it() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [image]}], "max_tokens": 4}
    assert refusal(body).param == "messages"
    media = Route(1, "tiny", False, (), 0, context=None, media=True)
    shaped = parse(body)
    assert admission.plan(shaped, media, None) >= shaped.media_parts * 16384


# -- the reservation: the cases the issue saw ------------------------------------------------------
def test_a_list_of_prompts_times_n_passes_no_cap() -> None:
    body = {"model": "tiny", "prompt": ["tell me a story"] * 60, "n": 4, "max_tokens": 16}
    error = refusal(body, "completions", cap=3000)
    assert error.param == "max_tokens" and "3840" in error.message
    shaped = parse(body, "completions")
    assert admission.plan(shaped, PLAIN, None) >= 60 * 4 * 16 + 60 * len("tell me a story")


def test_n_counts_against_the_per_request_cap() -> None:
    assert refusal({"model": "tiny", "messages": HELLO, "n": 8, "max_tokens": 16}, cap=16).param == "max_tokens"
    shaped = parse({"model": "tiny", "messages": HELLO, "n": 8})
    admission.plan(shaped, PLAIN, 16)
    assert shaped.max_tokens == 2 and shaped.sequences == 8  # the cap shared by the completions
    assert refusal({"model": "tiny", "messages": HELLO, "n": 8}, cap=4).param == "n"


def test_the_larger_max_field_is_reserved_and_forwarded() -> None:
    shaped = parse({"model": "tiny", "messages": HELLO, "max_tokens": 10, "max_completion_tokens": 300})
    reserve = admission.plan(shaped, PLAIN, None)
    assert shaped.max_tokens == 300 and reserve >= 300
    sent = orjson.loads(admission.encode(shaped, None, None))
    assert sent["max_tokens"] == 300 and "max_completion_tokens" not in sent
    assert refusal({"model": "tiny", "messages": HELLO, "max_tokens": 10, "max_completion_tokens": 300},
                   cap=100).param == "max_completion_tokens"  # fmt: skip


def test_token_id_prompts_and_best_of_count() -> None:
    shaped = parse({"model": "tiny", "prompt": [[1] * 500, [2] * 300], "max_tokens": 5, "best_of": 3, "n": 1},
                   "completions")  # fmt: skip
    assert admission.plan(shaped, PLAIN, None) == 800 + 2 * 3 * 5


def test_min_tokens() -> None:
    assert refusal({"model": "tiny", "messages": HELLO, "max_tokens": 5, "min_tokens": 9}).param == "min_tokens"
    shaped = parse({"model": "tiny", "messages": HELLO, "min_tokens": 2000})
    admission.plan(shaped, PLAIN, None)
    assert shaped.max_tokens == 2000  # the default is raised to what the client insists on


def test_context_length_bounds_each_prompt_and_completion() -> None:
    short = Route(1, "tiny", False, (), 0, context=512)
    shaped = parse({"model": "tiny", "prompt": ["x" * 5000, "y"], "max_tokens": 4000}, "completions")
    assert admission.plan(shaped, short, None) == 512 + (1 + 8) + 2 * 512


def test_a_request_without_max_tokens_gets_one_forwarded() -> None:
    shaped = parse({"model": "tiny", "messages": HELLO, "stream": True, "stream_options": {"include_usage": False}})
    admission.plan(shaped, PLAIN, None)
    sent = orjson.loads(admission.encode(shaped, -10, "salt"))
    assert sent["max_tokens"] == 1024 and sent["priority"] == -10 and sent["cache_salt"] == "salt"
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert not shaped.wants_usage


def test_redirection_and_openai_only_fields_are_not_forwarded() -> None:
    shaped = parse({"model": "tiny", "messages": HELLO, "api_base": "http://evil", "base_url": "http://evil",
                    "priority": -100, "request_id": "x", "store": True, "metadata": {"a": "b"}})  # fmt: skip
    admission.plan(shaped, PLAIN, None)
    sent = orjson.loads(admission.encode(shaped, None, None))
    assert set(sent) == {"model", "messages", "max_tokens"}


def test_embeddings_reserve_their_inputs() -> None:
    shaped = parse({"model": "tiny", "input": ["ab", "cd"]}, "embeddings")
    assert admission.plan(shaped, PLAIN, 1) == 2 * (2 + 8)
    assert refusal({"model": "tiny", "input": "x", "encoding_format": "hex"}, "embeddings").param == "encoding_format"


def test_a_typical_chat_request_validates_in_microseconds() -> None:
    """Not a timing test (bench/gateway.py measures validate_us): the decoder is the compiled one."""
    assert type(admission.schemas.DECODERS["chat/completions"]).__module__ == "msgspec.json"


# -- properties --------------------------------------------------------------------------------------
def worst_case_usage(endpoint: str, sent: dict[str, Any], context: int | None = None) -> tuple[int, int]:
    """The most an engine can bill for the request as forwarded: a tokenizer that makes one token of
    every byte, plus special tokens and a chat template's own tokens, and every completion at its max.
    With a context length: a prompt longer than it makes the engine refuse the request (nothing is
    billed), and no completion runs past it."""
    if endpoint == "chat/completions":
        text = sum(len(orjson.dumps(m)) for m in sent["messages"]) + len(orjson.dumps(sent.get("tools") or []))
        prompts = [text + 200]
    else:
        value = sent["prompt"] if endpoint == "completions" else sent["input"]
        if isinstance(value, str):
            prompts = [len(value.encode()) + 2]
        elif value and isinstance(value[0], str):
            prompts = [len(v.encode()) + 2 for v in value]
        elif value and isinstance(value[0], list):
            prompts = [len(v) for v in value]
        else:
            prompts = [len(value)]
    if context and any(prompt > context for prompt in prompts):
        return 0, 0
    if endpoint == "embeddings":
        return sum(prompts), 0
    width = max(sent.get("n") or 1, sent.get("best_of") or 1)
    longest = min(sent["max_tokens"], context) if context else sent["max_tokens"]
    return sum(prompts), len(prompts) * width * longest


texts = st.text(max_size=60)
token_ids = st.lists(st.integers(0, 50_000), min_size=1, max_size=20)
prompts = st.one_of(texts, st.lists(texts, min_size=1, max_size=8), token_ids,
                    st.lists(token_ids, min_size=1, max_size=5))  # fmt: skip
counts = st.one_of(st.none(), st.integers(1, 400))
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts})
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), texts)
anything = st.recursive(scalars,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                        max_leaves=6)  # fmt: skip


@st.composite
def requests(draw: Any) -> tuple[str, dict[str, Any]]:
    endpoint = draw(st.sampled_from(["chat/completions", "completions", "embeddings"]))
    body: dict[str, Any] = {"model": "tiny"}
    if endpoint == "chat/completions":
        body["messages"] = draw(st.lists(message, min_size=1, max_size=5))
    elif endpoint == "completions":
        body["prompt"] = draw(prompts)
    else:
        body["input"] = draw(prompts)
    if endpoint != "embeddings":
        for name in ("max_tokens", "max_completion_tokens" if endpoint == "chat/completions" else "best_of", "n",
                     "min_tokens"):  # fmt: skip
            value = draw(counts)
            if value is not None:
                body[name] = min(value, 8) if name in ("n", "best_of") else value
        body["stream"] = draw(st.booleans())
    return endpoint, body


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.one_of(st.none(), st.integers(1, 5000)), st.one_of(st.none(), st.integers(16, 4096)))
def test_no_accepted_request_can_be_billed_more_than_reserved(request: Any, cap: int | None,
                                                              context: int | None) -> None:  # fmt: skip
    endpoint, body = request
    route = Route(1, "tiny", False, (), 0, context=context)
    shaped = admission.parse(endpoint, orjson.dumps(body))
    try:
        reserve = admission.plan(shaped, route, cap)
    except GatewayError as error:
        assert error.status == 400 and error.param
        return
    sent = orjson.loads(admission.encode(shaped, None, "salt"))
    prompt, completion = worst_case_usage(endpoint, sent, context)
    assert prompt + completion <= reserve
    if cap is not None and endpoint != "embeddings":
        assert shaped.sequences * sent["max_tokens"] <= cap


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.sampled_from(["chat/completions", "completions", "embeddings"]),
       st.sampled_from(["model", "messages", "prompt", "input", "n", "max_tokens", "stream", "stream_options",
                        "user", "stop", "logit_bias", "response_format", "tools", "best_of", "min_tokens"]),
       anything)  # fmt: skip
def test_nothing_is_coerced_and_nothing_fails(endpoint: str, name: str, value: Any) -> None:
    """Any JSON value in any field: accepted as exactly that type, or refused with a 400 naming a field."""
    body = {"model": "tiny", "messages": HELLO, "prompt": "x", "input": "x"}
    body = {k: v for k, v in body.items() if k == "model" or k == {"chat/completions": "messages",
            "completions": "prompt", "embeddings": "input"}[endpoint]}  # fmt: skip
    body[name] = value
    try:
        shaped = admission.parse(endpoint, json.dumps(body).encode())  # json: any size of integer
        admission.plan(shaped, PLAIN, 512)
    except GatewayError as error:
        assert error.status == 400 and error.param, error.message
        return
    sent = orjson.loads(admission.encode(shaped, None, None))
    if name in sent and name not in ("max_tokens", "stream_options"):
        assert sent[name] == value and type(sent[name]) is type(value)  # forwarded as sent, never coerced
