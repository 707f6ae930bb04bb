"""The playground: a console user tries a deployment from the browser, on a department's behalf.

The page never holds a key. Its chat request goes to the console (session and CSRF), which checks
that the user may spend that department's quota on that deployment and forwards the request to its
own ``/v1`` gateway with the department's playground key (``tenancy.PlaygroundKey``), streaming the
answer back as it comes. So a playground answer is admitted, limited and billed exactly like any
other call of the department, and shows in its usage under the key "Console playground"."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from django.conf import settings
from django.db.models import QuerySet
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from appliance.roles import Role, managed_department_ids, role_of
from tenancy.models import Department, PlaygroundKey


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: StrictStr = Field(max_length=100_000)


class ChatIn(BaseModel):
    """What the page sends: strict, so a wrong type is an error, never a guess."""

    model_config = ConfigDict(extra="forbid")
    department: StrictInt
    deployment: StrictStr = Field(min_length=1, max_length=100)
    messages: list[Message] = Field(min_length=1, max_length=100)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(None, ge=1, le=32768)
    stop: list[StrictStr] = Field(default_factory=list, max_length=4)

    def body(self) -> dict[str, Any]:
        """The OpenAI chat request the gateway gets (streamed, with usage at the end)."""
        body: dict[str, Any] = {
            "model": self.deployment, "messages": [m.model_dump() for m in self.messages], "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        for name in ("temperature", "top_p", "max_tokens"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop:
            body["stop"] = [s for s in self.stop if s]
        return body


def departments_for(user: Any) -> QuerySet[Department]:
    """Departments whose quota the user may spend here: all for the box's admins and operators, the
    ones they administer for department admins, none for anyone else."""
    active = Department.objects.filter(archived_at__isnull=True).order_by("name")
    if role_of(user) in (Role.APPLIANCE_ADMIN, Role.OPERATOR):
        return active
    ids = managed_department_ids(user)
    return active if ids is None else active.filter(pk__in=ids or [])


def deployments_of(department: Department) -> list[str]:
    """Served names the department may use (its keys' gateway sees the same)."""
    return sorted(department.deployments.filter(archived_at__isnull=True).values_list("name", flat=True))


def snippet(request_body: dict[str, Any], base_url: str) -> str:
    """The same call with curl and from Python with the openai client (the key left for the reader)."""
    options = "".join(f", {name}={request_body[name]!r}" for name in ("temperature", "top_p", "max_tokens", "stop")
                      if name in request_body)  # fmt: skip
    body = json.dumps({**request_body, "stream": True}, ensure_ascii=False).replace("'", "'\\''")
    return (
        f"curl {base_url}/chat/completions -H 'Authorization: Bearer sk-apc-…' \\\n"
        f"  -H 'Content-Type: application/json' -d '{body}'\n\n"
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{base_url}", api_key="sk-apc-…")\n'
        f"stream = client.chat.completions.create(model={request_body['model']!r}, "
        f"messages={request_body['messages']!r}{options}, stream=True)\n"
        "for chunk in stream:\n"
        '    print(chunk.choices[0].delta.content or "", end="") if chunk.choices else None\n'
    )


async def stream(department: Department, body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The chat sent to the console's gateway with the department's playground key, its answer passed
    on as server-sent events as they come. A refusal (a quota, a stopped deployment) or an
    unreachable gateway comes as one event ``{"error": {...}}``, in OpenAI's error shape."""
    from asgiref.sync import sync_to_async

    raw = await sync_to_async(PlaygroundKey.secret_for)(department)
    timeout = httpx.Timeout(settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS, connect=5)
    headers = {"Authorization": f"Bearer {raw}"}
    async with httpx.AsyncClient(base_url=settings.GATEWAY_INTERNAL_URL, timeout=timeout) as client:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                if response.status_code != 200:
                    found = await response.aread()
                    try:
                        error = json.loads(found)["error"]
                    except (ValueError, KeyError, TypeError):
                        error = {"message": found.decode(errors="replace")[:500], "code": "upstream_error"}
                    yield _event({"error": {**error, "status": response.status_code}})
                    return
                async for chunk in response.aiter_raw():
                    yield chunk
        except httpx.HTTPError as exc:
            message = f"The console's gateway did not answer ({type(exc).__name__})."
            yield _event({"error": {"message": message, "code": "gateway_unreachable", "status": 502}})


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"
