"""The /v1 gateway with the openai client as the caller, in front of the FAKE engine (the real vLLM
CPU engine is behind it in tests/engine/): answers, streaming, usage, every refusal, safety rules,
disconnects, failover, priority and the queue."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
from django.utils import timezone

from gateway.app import GatewayApp
from provisioning.models import Deployment
from tenancy import usage
from tenancy.models import ApiKey, Department, UsageRecord
from tests.gateway.conftest import Tenant, add_replica
from tests.gateway.helpers import BrokenEngine, FakeEngineProcess, ServerThread

pytestmark = pytest.mark.django_db(transaction=True)
HELLO = [{"role": "user", "content": "hello"}]


def drained(redis_db: redis.Redis, expected: int) -> list[UsageRecord]:
    """The usage records once ``expected`` are in (or after 5 s): the gateway records a request just
    after its answer went out, so a client can be quicker than the record."""
    deadline = time.monotonic() + 5
    while True:
        usage.drain(redis_db)
        records = list(UsageRecord.objects.order_by("created_at"))
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def post(tenant: Tenant, body: Any, raw: str | None = None, path: str = "/v1/chat/completions", **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {raw or tenant.raw}"} | kw.pop("headers", {})
    return httpx.post(tenant.url + path, headers=headers, json=body, timeout=10, **kw)


def test_chat_completion_is_answered_billed_and_recorded(tenant: Tenant, redis_db: redis.Redis) -> None:
    raw = tenant.client().chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=8)
    answer = raw.parse()
    assert answer.choices[0].message.content == " ".join(["tok"] * 8)
    assert answer.usage.completion_tokens == 8
    assert float(raw.headers["x-gateway-overhead-ms"]) >= 0
    (record,) = drained(redis_db, 1)
    assert (record.department, record.api_key, record.deployment) == (tenant.department, tenant.key, tenant.deployment)
    assert (record.status, record.completion_tokens, record.endpoint) == (200, 8, "chat/completions")
    assert record.prompt_tokens == answer.usage.prompt_tokens and record.client == "127.0.0.1"
    assert record.ttft_ms is not None and record.latency_ms >= record.ttft_ms


def test_streaming_hides_usage_unless_asked(tenant: Tenant, engine: FakeEngineProcess, redis_db: redis.Redis) -> None:
    chunks = list(tenant.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True))
    assert len(chunks) == 5 and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content for c in chunks) == "tok " * 5
    sent = engine.seen()[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}  # forced upstream

    asked = list(tenant.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in asked[:-1])
    records = drained(redis_db, 2)
    assert [r.completion_tokens for r in records] == [5, 5] and all(r.status == 200 for r in records)


def test_completions_and_embeddings(tenant: Tenant, redis_db: redis.Redis) -> None:
    client = tenant.client()
    assert client.completions.create(model="tiny", prompt="once upon", max_tokens=3).choices[0].text == "tok tok tok"
    text = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt="x", max_tokens=2,
                                                                          stream=True))  # fmt: skip
    assert text == "tok tok "
    assert client.embeddings.create(model="tiny", input="a sentence").data[0].embedding == [0.1, 0.2, 0.3]
    assert [r.endpoint for r in drained(redis_db, 3)] == ["completions", "completions", "embeddings"]


def test_models_listing_shows_only_what_the_key_may_use(
    tenant: Tenant, deployment_factory: Any, engine: FakeEngineProcess
) -> None:
    other = deployment_factory(name="big")
    add_replica(other, engine.port, engine.key)
    assert [m.id for m in tenant.client().models.list()] == ["tiny"]
    tenant.department.deployments.add(other)
    time.sleep(0.6)  # the gateway's cache
    assert sorted(m.id for m in tenant.client().models.list()) == ["big", "tiny"]
    assert tenant.client().models.retrieve("tiny").id == "tiny"
    _, raw = ApiKey.issue(tenant.department, "narrow", all_deployments=False, deployments=[other])  # narrows it
    assert [m.id for m in tenant.client(raw).models.list()] == ["big"]
    with pytest.raises(openai.PermissionDeniedError):
        tenant.client(raw).chat.completions.create(model="tiny", messages=HELLO)


@pytest.mark.parametrize(
    "raw",
    ["", "sk-apc-short", "not a key at all", "x" * 5000],
    ids=["empty", "truncated", "garbage", "huge"],
)
def test_bad_keys_get_401_without_echoing_the_key(tenant: Tenant, raw: str) -> None:
    headers = {"Authorization": f"Bearer {raw}" if raw else "Bearer"}
    response = post(tenant, {"model": "tiny", "messages": HELLO}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] in ("invalid_api_key", "missing_api_key")
    assert raw not in response.text or not raw


def test_wrong_checksum_revoked_expired_and_rotated_keys(tenant: Tenant) -> None:
    raw = tenant.raw
    damaged = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    assert post(tenant, {"model": "tiny", "messages": HELLO}, raw=damaged).status_code == 401
    _, expired = ApiKey.issue(tenant.department, "old", expires_at=timezone.now() - timedelta(seconds=1))
    assert post(tenant, {"model": "tiny", "messages": HELLO}, raw=expired).status_code == 401
    assert (
        post(tenant, {"model": "tiny", "messages": HELLO}, raw=None, headers={"Authorization": ""}).status_code == 401
    )

    _new, new_raw = tenant.key.rotate(timedelta(seconds=1))
    assert post(tenant, {"model": "tiny", "messages": HELLO}).status_code == 200  # in its grace period
    assert post(tenant, {"model": "tiny", "messages": HELLO}, raw=new_raw).status_code == 200
    time.sleep(1.1)
    assert post(tenant, {"model": "tiny", "messages": HELLO}).status_code == 401  # rotated out


def test_a_revoked_key_is_refused_within_a_second(tenant: Tenant) -> None:
    assert post(tenant, {"model": "tiny", "messages": HELLO}).status_code == 200  # cached in the gateway now
    tenant.key.revoke()
    revoked = time.monotonic()
    while post(tenant, {"model": "tiny", "messages": HELLO}).status_code == 200:
        assert time.monotonic() - revoked < 1.0, "a revoked key still worked after a second"
        time.sleep(0.05)
    response = post(tenant, {"model": "tiny", "messages": HELLO})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_unknown_and_forbidden_models(tenant: Tenant, deployment_factory: Any) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        tenant.client().chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    deployment_factory(name="secret-model")
    time.sleep(0.6)  # the gateway's cache
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        tenant.client().chat.completions.create(model="secret-model", messages=HELLO)
    assert forbidden.value.body["code"] == "model_not_allowed"


def test_only_allowlisted_endpoints_reach_an_engine(tenant: Tenant, engine: FakeEngineProcess) -> None:
    for path in ("/v1/tokenize", "/v1/../tokenize", "/v1/pause", "/v1/invocations", "/v1/chat/completions/x"):
        response = post(tenant, {"model": "tiny", "prompt": "x"}, path=path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "unknown_url"
    response = httpx.get(tenant.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {tenant.raw}"})
    assert response.status_code == 405
    assert engine.seen() == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": HELLO, "prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"model": "tiny", "messages": HELLO, "chat_template": "{{ 7*7 }}"}, "chat_template"),
        ({"model": "tiny", "messages": HELLO, "chat_template_kwargs": {"chat_template": "x"}}, "chat_template_kwargs"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": 513}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "messages": HELLO, "n": 99}, "n"),
        ({"model": "tiny", "messages": HELLO, "guided_regex": "(unclosed"}, "guided_regex"),
        ({"model": "tiny", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": "x"}},
         "response_format.json_schema"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"messages": HELLO}, "model"),
        ([1, 2, 3], "body"),
    ],
    ids=["prompt_embeds", "chat_template", "template_kwargs", "max_tokens_cap", "max_tokens_negative", "n", "regex",
         "json_schema", "no_messages", "no_model", "not_an_object"],
)  # fmt: skip
def test_refused_fields(tenant: Tenant, engine: FakeEngineProcess, body: Any, param: str) -> None:
    response = post(tenant, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine.seen() == []


def test_redirection_fields_are_dropped_and_bad_json_refused(tenant: Tenant, engine: FakeEngineProcess) -> None:
    body = {"model": "tiny", "messages": HELLO, "api_base": "http://evil", "base_url": "http://evil", "max_tokens": 2}
    assert post(tenant, body).status_code == 200
    sent = engine.seen()[-1]["body"]
    assert "api_base" not in sent and "base_url" not in sent
    bad = httpx.post(tenant.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {tenant.raw}"})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_size_limits(tenant: Tenant, settings: Any) -> None:
    settings.GATEWAY_MAX_BODY_BYTES = 10_000
    big = post(tenant, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    headers = {f"x-junk-{i}": "y" * 1000 for i in range(20)}
    assert post(tenant, {"model": "tiny", "messages": HELLO}, headers=headers).status_code == 431


def test_rate_limit_answers_429_with_headers(tenant: Tenant, redis_db: redis.Redis) -> None:
    Department.objects.filter(pk=tenant.department.pk).update(rpm=6)  # a burst of 1 per 10 s
    assert post(tenant, {"model": "tiny", "messages": HELLO}).status_code == 200
    refused = post(tenant, {"model": "tiny", "messages": HELLO})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_rpm"
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    with pytest.raises(openai.RateLimitError):
        tenant.client().chat.completions.create(model="tiny", messages=HELLO)
    statuses = [r.status for r in drained(redis_db, 3)]
    assert statuses == [200, 429, 429]


def test_a_keys_own_rate_limit_leaves_its_department_alone(tenant: Tenant) -> None:
    _, narrow = ApiKey.issue(tenant.department, "cron job", rpm=6)
    assert post(tenant, {"model": "tiny", "messages": HELLO}, raw=narrow).status_code == 200
    refused = post(tenant, {"model": "tiny", "messages": HELLO}, raw=narrow)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_key_rpm"
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    assert all(post(tenant, {"model": "tiny", "messages": HELLO}).status_code == 200 for _ in range(3))


def test_token_budget_is_settled_to_real_usage(tenant: Tenant, redis_db: redis.Redis) -> None:
    Department.objects.filter(pk=tenant.department.pk).update(tokens_per_day=1000)
    # Each request reserves its max_tokens (500) + the prompt's bound (body bytes + what a chat template
    # may add, 256); it uses ~10, so it is settled back.
    # Five of them would be over 4,000 reserved: they all pass because each is settled to what it used. The
    # settlement follows the answer (after it went out), so each waits for the one before.
    for _ in range(5):
        assert post(tenant, {"model": "tiny", "messages": HELLO, "max_tokens": 500}).status_code == 200
        (day,) = list(redis_db.scan_iter("lim:*:day:*"))
        assert wait(lambda key=day: 0 < int(redis_db.get(key)) < 200), int(redis_db.get(day))
    longer = [{"role": "user", "content": "hello " * 40}]  # its bound (+240) no longer fits the day's 1,000
    refused = post(tenant, {"model": "tiny", "messages": longer, "max_tokens": 500})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_tokens_per_day"


def test_no_ready_replica_gives_503(tenant: Tenant) -> None:
    tenant.deployment.replica_set.update(state="starting")
    with pytest.raises(openai.InternalServerError) as error:
        tenant.client().chat.completions.create(model="tiny", messages=HELLO)
    assert error.value.status_code == 503 and error.value.body["code"] == "no_replica_ready"


@contextmanager
def own_gateway() -> Iterator[ServerThread]:
    """A gateway of the test's own, made after the test changed settings (a fixture's is made before)."""
    app = GatewayApp()
    server = ServerThread(app, app.close).start()
    try:
        yield server
    finally:
        server.stop()


def department_on(deployment_factory: Any, engine: FakeEngineProcess, name: str = "Ops") -> str:
    """Deployment 'tiny' on ``engine``, a department allowed to use it; returns its key."""
    deployment = deployment_factory(name="tiny")
    add_replica(deployment, engine.port, engine.key)
    department = Department.objects.create(name=name)
    department.deployments.add(deployment)
    return ApiKey.issue(department, "bot")[1]


def test_redis_unreachable_fails_closed(deployment_factory: Any, engine: FakeEngineProcess, settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    with own_gateway() as app_server:
        raw = department_on(deployment_factory, engine)
        response = httpx.post(app_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {raw}"},
                              json={"model": "tiny", "messages": HELLO}, timeout=15)  # fmt: skip
        assert response.status_code == 503 and response.json()["error"]["code"] == "quota_unavailable"
        # Its usage record could not go to Redis either: it waits in the gateway's spool.
        assert wait(lambda: any(settings.VAR_DIR.glob("spool/gateway-*.jsonl")))
        (spooled,) = [
            orjson.loads(line) for f in settings.VAR_DIR.glob("spool/*.jsonl") for line in f.read_bytes().splitlines()
        ]
        assert spooled["entry"]["s"] == "503" and spooled["entry"]["x"] == "quota_unavailable"


def test_client_disconnect_mid_stream_is_billed(deployment_factory: Any, redis_db: redis.Redis) -> None:
    slow = FakeEngineProcess(token_delay=0.05, tokens=200).start()
    try:
        with own_gateway() as server:
            raw = department_on(deployment_factory, slow)
            body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "stream": True}
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {raw}"}, timeout=10) as response:  # fmt: skip
                assert response.status_code == 200
                lines = response.iter_lines()
                received = [line for line, _ in zip(lines, range(10), strict=False) if line.startswith("data: ")]
            assert len(received) >= 4
            assert wait(lambda: slow.stats()["disconnected"] == 1), "the upstream request was not cancelled"
            (record,) = drained(redis_db, 1)
            assert record.status == 499 and record.error == "client_disconnected"
            assert 4 <= record.completion_tokens < 200 and record.prompt_tokens > 0
    finally:
        slow.kill()


def wait(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_failover_when_a_replica_dies_mid_load(tenant: Tenant, engine: FakeEngineProcess) -> None:
    second = FakeEngineProcess(key="second-secret", token_delay=0.005, tokens=20).start()
    add_replica(tenant.deployment, second.port, second.key, ordinal=1)
    dead_port = FakeEngineProcess().port  # nothing listens: a replica whose engine just died
    add_replica(tenant.deployment, dead_port, "x", ordinal=2)
    time.sleep(0.6)
    results: list[int] = []

    def load() -> None:
        for _ in range(15):
            results.append(post(tenant, {"model": "tiny", "messages": HELLO, "max_tokens": 20}).status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    second.kill()  # dies mid-load
    for thread in threads:
        thread.join()
    assert results == [200] * 60


@contextmanager
def broken_replica(tenant: Tenant, mode: str, alone: bool = False) -> Iterator[BrokenEngine]:
    """A BrokenEngine (``mode``) as the first replica of ``tenant``'s deployment, or its only one."""
    if alone:
        tenant.deployment.replica_set.all().delete()
    else:
        tenant.deployment.replica_set.update(ordinal=5)  # the broken one comes first in the route
    broken = BrokenEngine(mode).start()
    try:
        add_replica(tenant.deployment, broken.port, broken.key, ordinal=0)
        time.sleep(0.6)  # the gateway's cache
        yield broken
    finally:
        broken.stop()


def stream_chat(tenant: Tenant) -> Any:
    return httpx.stream("POST", tenant.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {tenant.raw}"},
                        json={"model": "tiny", "messages": HELLO, "stream": True}, timeout=10)  # fmt: skip


@pytest.mark.parametrize("mode", ["reset", "truncate"])
def test_a_replica_that_fails_before_answering_is_left_for_another(
    tenant: Tenant, redis_db: redis.Redis, mode: str
) -> None:
    """An engine killed while it holds a request: the connection is reset, or the answer is cut
    before the client saw any of it. The request goes to another replica instead of failing."""
    with broken_replica(tenant, mode) as broken:
        answers = [post(tenant, {"model": "tiny", "messages": HELLO, "max_tokens": 4}) for _ in range(3)]
    assert broken.hits == 1  # tried once, then left alone while marked down
    assert [a.status_code for a in answers] == [200] * 3, answers[0].text
    assert [(r.status, r.error) for r in drained(redis_db, 3)] == [(200, "")] * 3


def test_an_engine_that_dies_mid_stream_ends_the_stream_and_is_recorded(tenant: Tenant, redis_db: redis.Redis) -> None:
    events = []
    with broken_replica(tenant, "truncate_stream", alone=True):
        with pytest.raises(httpx.RemoteProtocolError):  # the stream ends without its last chunk
            with stream_chat(tenant) as response:
                assert response.status_code == 200
                events.extend(response.iter_lines())
    assert events[0].startswith("data: ") and "[DONE]" not in "".join(events)
    assert [(r.status, r.error) for r in drained(redis_db, 1)] == [(502, "upstream_failed")]


def test_a_client_that_leaves_right_after_done_had_its_whole_answer(
    deployment_factory: Any, redis_db: redis.Redis
) -> None:
    """The openai client closes the connection as soon as it reads [DONE]; an engine may close its
    stream a moment later. That is a finished answer (200), not a client that left (499)."""
    lingering = FakeEngineProcess(linger=1.0).start()
    try:
        raw = department_on(deployment_factory, lingering)
        with own_gateway() as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=raw, max_retries=0)
            chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True))
            assert len(chunks) == 5
            assert len(drained(redis_db, 1)) == 1
        assert [(r.status, r.error, r.completion_tokens) for r in UsageRecord.objects.all()] == [(200, "", 5)]
    finally:
        lingering.kill()


def test_an_engine_that_dies_after_its_done_answered_in_full(tenant: Tenant, redis_db: redis.Redis) -> None:
    with broken_replica(tenant, "reset_after_done", alone=True), stream_chat(tenant) as response:
        events = [line for line in response.iter_lines() if line]  # the body ends cleanly
    assert events[-1] == "data: [DONE]" and response.status_code == 200
    assert [(r.status, r.error) for r in drained(redis_db, 1)] == [(200, "")]


def test_an_engine_too_slow_to_answer_gets_504_and_is_not_retried(
    deployment_factory: Any, settings: Any, redis_db: redis.Redis
) -> None:
    settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS = 0.3
    slow = FakeEngineProcess(first_delay=2).start()
    other = FakeEngineProcess(key="other-secret").start()
    try:
        raw = department_on(deployment_factory, slow)
        add_replica(Deployment.objects.get(), other.port, other.key, ordinal=1)
        with own_gateway() as server:
            response = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO},
                                  headers={"Authorization": f"Bearer {raw}"}, timeout=10)  # fmt: skip
        assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
        assert len(slow.seen()) == 1 and other.seen() == []  # a slow engine is busy, not dead: not sent twice
        assert [(r.status, r.error) for r in drained(redis_db, 1)] == [(504, "upstream_timeout")]
    finally:
        slow.kill()
        other.kill()


def test_priority_passed_to_engines_that_schedule_by_it(tenant: Tenant, engine: FakeEngineProcess) -> None:
    post(tenant, {"model": "tiny", "messages": HELLO, "priority": -100})
    assert "priority" not in engine.seen()[-1]["body"]  # clients cannot set their own
    tenant.deployment.extra_args = ["--scheduling-policy", "priority"]
    tenant.deployment.save()
    Department.objects.filter(pk=tenant.department.pk).update(priority="low")
    time.sleep(0.6)
    post(tenant, {"model": "tiny", "messages": HELLO})
    assert engine.seen()[-1]["body"]["priority"] == 10


def test_saturated_deployment_queues_high_priority_first(
    deployment_factory: Any, settings: Any, redis_db: redis.Redis
) -> None:
    settings.GATEWAY_REPLICA_CAPACITY = 1
    settings.GATEWAY_QUEUE_SECONDS = 5
    slow = FakeEngineProcess(token_delay=0.05, tokens=10).start()  # half a second a request
    app = GatewayApp()
    server = ServerThread(app, app.close).start()
    try:
        deployment = deployment_factory(name="tiny")
        add_replica(deployment, slow.port, slow.key)
        raws = {}
        for name, priority in (("Research", "high"), ("Marketing", "low")):
            department = Department.objects.create(name=name, priority=priority)
            department.deployments.add(deployment)
            raws[priority] = ApiKey.issue(department, "bot")[1]
        finished: list[str] = []

        def call(priority: str) -> None:
            response = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO},
                                  headers={"Authorization": f"Bearer {raws[priority]}"}, timeout=30)  # fmt: skip
            assert response.status_code == 200
            finished.append(priority)

        for priority in ("high", "low"):  # keys and route loaded, connections open: what follows is the gate
            call(priority)
        finished.clear()
        threads = []
        slow.hold()  # the first request keeps the only slot until every other one is queued
        for waiting, priority in enumerate(("low", "low", "low", "high")):  # one takes the only slot,
            threads.append(threading.Thread(target=call, args=(priority,)))  # two low wait, then a high
            threads[-1].start()
            if waiting == 0:
                assert wait(lambda: slow.stats()["in_flight"] == 1)
            else:
                assert wait(lambda n=waiting: redis_db.zcard(f"{{gate:{deployment.pk}}}:wait") == n)
        slow.release()
        for thread in threads:
            thread.join()
        assert finished[:2] == ["low", "high"], finished  # the high one overtook both waiting low ones
        assert slow.stats()["max_in_flight"] == 1

        settings.GATEWAY_QUEUE_SECONDS = 0
        slow.hold()
        hold = threading.Thread(target=call, args=("low",))
        hold.start()
        assert wait(lambda: slow.stats()["in_flight"] == 1)
        refused = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO},
                             headers={"Authorization": f"Bearer {raws['high']}"}, timeout=30)  # fmt: skip
        slow.release()
        hold.join()
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_timeout"
    finally:
        server.stop()
        slow.kill()


def test_two_gateway_processes_admit_what_one_would(
    deployment_factory: Any, settings: Any, redis_db: redis.Redis
) -> None:
    """Two gateways (two web workers, or two console instances) share one deployment's room: with
    room for two, eight requests spread over both never have more than two at the engine, and none
    is refused (the rest wait in the shared queue)."""
    settings.GATEWAY_REPLICA_CAPACITY = 2
    settings.GATEWAY_QUEUE_SECONDS = 30
    slow = FakeEngineProcess(token_delay=0.03, tokens=10).start()
    apps = [GatewayApp(), GatewayApp()]
    servers = [ServerThread(app, app.close).start() for app in apps]
    try:
        deployment = deployment_factory(name="tiny")
        add_replica(deployment, slow.port, slow.key)
        department = Department.objects.create(name="Research")
        department.deployments.add(deployment)
        raw = ApiKey.issue(department, "bot")[1]

        def call(server: ServerThread) -> int:
            response = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO},
                                  headers={"Authorization": f"Bearer {raw}"}, timeout=60)  # fmt: skip
            return response.status_code

        assert [call(server) for server in servers] == [200, 200]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, [servers[i % 2] for i in range(8)]))
        assert codes == [200] * 8
        assert slow.stats()["max_in_flight"] == 2
        assert wait(lambda: redis_db.zcard(f"{{gate:{deployment.pk}}}:held") == 0)  # all room given back
        # Redis lost its scripts (it restarted): the room still comes back at once, not after its lease.
        settings.GATEWAY_QUEUE_SECONDS = 0
        redis_db.script_flush()
        assert [call(servers[0]) for _ in range(3)] == [200, 200, 200]
    finally:
        for server in servers:
            server.stop()
        slow.kill()


def test_keys_never_reach_logs_or_errors(tenant: Tenant, caplog: Any, engine: FakeEngineProcess) -> None:
    caplog.set_level(logging.DEBUG)
    engine.kill()  # upstream failures are logged
    try:
        response = post(tenant, {"model": "tiny", "messages": HELLO})
        assert response.status_code == 503
        assert tenant.raw not in response.text and engine.key not in response.text
        assert tenant.raw not in caplog.text and engine.key not in caplog.text
        assert "failed (ClientConnectorError); trying another" in caplog.text
    finally:
        engine.start()


def test_metrics_per_department_and_model(tenant: Tenant, client: Any, settings: Any) -> None:
    settings.METRICS_TOKEN = "m-token"
    post(tenant, {"model": "tiny", "messages": HELLO, "max_tokens": 3})
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer m-token").content.decode()
    assert 'gateway_requests_total{department="Legal",model="tiny",status="200"}' in text
    assert 'gateway_tokens_total{department="Legal",kind="completion",model="tiny"}' in text
    assert "gateway_time_to_first_token_seconds_bucket" in text and "gateway_overhead_seconds" in text


def test_console_asgi_sends_v1_to_the_gateway_and_the_rest_to_django(tenant: Tenant) -> None:
    from appliance.asgi import application, gateway

    server = ServerThread(application, gateway.close).start()
    try:
        listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {tenant.raw}"})
        assert [m["id"] for m in listed.json()["data"]] == ["tiny"]
        assert httpx.get(server.url + "/healthz").status_code in (200, 503)
        assert httpx.get(server.url + "/v1/nothing").json()["error"]["code"] == "unknown_url"
    finally:
        server.stop()
