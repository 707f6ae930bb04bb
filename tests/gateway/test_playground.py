"""The playground: the page lists what the user may try, its chat goes through the real gateway (on its
own port, a FAKE engine behind it) with the department's playground key and streams back; what the
gateway refuses comes back as an error event; bad input, other departments' deployments and roles
that may not spend a quota are refused before anything is sent."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from gateway.playground import snippet
from tenancy.models import ApiKey, Department, Membership, PlaygroundKey, UsageRecord
from tests.gateway.conftest import Tenant
from tests.workers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
URL = "/playground/chat"


def chat(client: Client, **fields: Any) -> Any:
    body = {"department": fields.pop("department"), "deployment": "tiny",
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4} | fields  # fmt: skip
    return client.post(URL, json.dumps(body), content_type="application/json")


def events(response: Any) -> list[Any]:
    text = b"".join(response).decode()
    return [
        json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.split("\n\n") if e.startswith("data: ")
    ]


@pytest.fixture
def playing(tenant: Tenant, settings: Any) -> Tenant:
    settings.GATEWAY_INTERNAL_URL = tenant.url
    return tenant


def test_the_page_offers_the_departments_deployments(admin_client: Client, playing: Tenant) -> None:
    page = admin_client.get(reverse("gateway:playground")).content.decode()
    assert "Legal" in page and json.loads(page.split('id="playground-choices" type="application/json">')[1]
                                          .split("</script>")[0]) == {str(playing.department.pk): ["tiny"]}  # fmt: skip


def test_a_chat_streams_through_the_gateway_billed_to_the_department(
    admin_client: Client, playing: Tenant, redis_db: Any
) -> None:
    response = chat(admin_client, department=playing.department.pk, temperature=0.2, stop=["\n\n"])
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    assert "model='tiny'" in json.loads(response["X-Snippet"]) and "sk-apc-" in json.loads(response["X-Snippet"])
    found = events(response)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in found[:-1] if c.get("choices"))
    assert text == "tok " * 4 and found[-1] == "[DONE]" and found[-2]["usage"]["completion_tokens"] == 4
    key = PlaygroundKey.objects.get(department=playing.department).key
    assert key.name == "Console playground" and key.department == playing.department

    from tenancy import usage

    assert wait_for(lambda: usage.drain(redis_db) >= 0 and UsageRecord.objects.filter(api_key=key).exists(), 10)
    # The same key next time; a new one once it was revoked on the department's page.
    chat(admin_client, department=playing.department.pk)
    assert PlaygroundKey.objects.count() == 1 and PlaygroundKey.objects.get().key == key
    key.revoke()
    assert events(chat(admin_client, department=playing.department.pk))[-1] == "[DONE]"
    assert PlaygroundKey.objects.get().key != key and not ApiKey.objects.get(pk=key.pk).is_usable


def test_what_the_gateway_refuses_comes_back_as_an_error_event(
    admin_client: Client, playing: Tenant, settings: Any
) -> None:
    Department.objects.filter(pk=playing.department.pk).update(max_tokens_per_request=2)
    refused = events(chat(admin_client, department=playing.department.pk, max_tokens=100))
    assert len(refused) == 1 and refused[0]["error"]["status"] == 400 and "max_tokens" in refused[0]["error"]["message"]
    settings.GATEWAY_INTERNAL_URL = "http://127.0.0.1:9"  # nothing listens there
    down = events(chat(admin_client, department=playing.department.pk, max_tokens=1))
    assert down[0]["error"]["code"] == "gateway_unreachable"


@pytest.mark.parametrize(
    ("change", "status", "text"),
    [
        ({"temperature": "hot"}, 400, "temperature"),
        ({"max_tokens": True}, 400, "max_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
        ({"api_base": "http://evil"}, 400, "api_base"),
        ({"top_p": 0}, 400, "top_p"),
        ({"deployment": "not-allowed"}, 404, "may not use"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_sent(
    admin_client: Client, playing: Tenant, change: dict, status: int, text: str
) -> None:
    response = chat(admin_client, department=playing.department.pk, **change)
    assert response.status_code == status and text in response.json()["error"]["message"]
    assert not PlaygroundKey.objects.exists()  # no key made, nothing sent


def test_only_roles_that_may_spend_a_quota_and_only_on_their_departments(
    client: Client, playing: Tenant, viewer_user: Any, dept_admin_user: Any
) -> None:
    assert client.post(URL, b"{}", content_type="application/json").status_code == 302  # signed out: sign in
    client.force_login(viewer_user)
    assert chat(client, department=playing.department.pk).status_code == 403
    assert client.get(reverse("gateway:playground")).status_code == 403
    client.force_login(dept_admin_user)
    assert chat(client, department=playing.department.pk).status_code == 404  # not a department of hers
    assert "No department of yours" in client.get(reverse("gateway:playground")).content.decode()
    Membership.objects.create(user=dept_admin_user, department=playing.department, role="department_admin")
    assert events(chat(client, department=playing.department.pk))[-1] == "[DONE]"
    assert client.post(URL, b"not json", content_type="application/json").status_code == 400


def test_the_snippet_is_the_same_call_with_curl_and_in_python() -> None:
    import shlex

    body = {"model": "m", "messages": [{"role": "user", "content": "it's"}], "max_tokens": 5}
    curl, python = snippet(body, "http://c/v1").split("\n\n", 1)
    words = shlex.split(curl.replace("\\\n", " "))
    assert words[:2] == ["curl", "http://c/v1/chat/completions"]
    assert json.loads(words[words.index("-d") + 1]) == body | {"stream": True}  # quotes survive the shell
    assert 'base_url="http://c/v1"' in python and "max_tokens=5" in python and "stream=True" in python
    compile(python, "snippet", "exec")
