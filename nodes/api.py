"""Nodes in the management API: list, join tokens, draining, forgetting; and the join itself, which
a new box calls with its one-time token instead of an API token."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status

from appliance import audit
from appliance.api import require
from nodes.models import JoinToken, Node, NodeAlive
from nodes.registry import JoinRefused, join, nodes_with_workload

router = Router(tags=["nodes"])

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,63}$"  # as env_node_name: it becomes a queue name


class NodeOut(Schema):
    id: int
    name: str
    address: str
    state: str
    draining: bool
    cpus: int
    memory_bytes: int
    disk_free_bytes: int
    gpus: int
    version: str
    facts: dict
    last_heartbeat: datetime | None
    state_since: datetime
    running: list[str] = []


class JoinTokenOut(Schema):
    id: int
    token: str
    expires_at: datetime


class DrainIn(Schema):
    draining: bool


class JoinIn(Schema):
    token: str = Field(..., max_length=200)
    name: str = Field(..., pattern=NAME_PATTERN)
    address: str = Field("", max_length=255, pattern=r"^[A-Za-z0-9.:\[\]-]*$")
    cpus: int = Field(0, ge=0, le=100_000)
    memory_bytes: int = Field(0, ge=0)
    disk_free_bytes: int = Field(0, ge=0)
    gpus: int = Field(0, ge=0, le=1024)
    version: str = Field("", max_length=50)
    facts: dict = Field(default_factory=dict)


@router.get("/nodes", response=list[NodeOut], summary="The boxes of the appliance and what runs on each")
def list_nodes(request: HttpRequest) -> Any:
    require(request, "node.view")
    return nodes_with_workload()


@router.post("/nodes/join-tokens", response={201: JoinTokenOut}, summary="A one-time token for a new box to join")
def create_join_token(request: HttpRequest) -> Status:
    require(request, "node.manage", action="node.join_token")
    with transaction.atomic():
        token, raw = JoinToken.issue(request.user)
        audit.record(request, "node.join_token", token, detail={"via": "api"})
    return Status(201, {"id": token.pk, "token": raw, "expires_at": token.expires_at})


@router.post("/nodes/join", auth=None, summary="Join this console (a new box, with a join token)")
def join_cluster(request: HttpRequest, payload: JoinIn) -> dict[str, str]:
    """Answers what the new box must set (database and Redis addresses, secret key): the token is
    the credential, used once."""
    facts = payload.dict(exclude={"token", "name"})
    try:
        config = join(payload.token, payload.name, facts)
    except JoinRefused as exc:
        audit.record(request, "node.join", outcome="denied", detail={"node": payload.name, "reason": str(exc)})
        raise HttpError(exc.status, str(exc)) from None
    audit.record(request, "node.join", detail={"node": payload.name, "address": payload.address})
    return config


@router.post("/nodes/{node_id}/drain", response=NodeOut, summary="Drain a node (any-box replicas move) or undo")
def drain(request: HttpRequest, node_id: int, payload: DrainIn) -> Any:
    action = "node.drain" if payload.draining else "node.resume"
    require(request, "node.manage", action=action)
    node = get_object_or_404(Node, pk=node_id)
    node.set_draining(payload.draining)
    audit.record(request, action, node, detail={"via": "api"})
    return node


@router.delete("/nodes/{node_id}", response={204: None}, summary="Forget an unreachable node")
def forget(request: HttpRequest, node_id: int) -> Status:
    require(request, "node.manage", action="node.forget")
    node = get_object_or_404(Node, pk=node_id)
    try:
        node.forget()
    except NodeAlive as exc:
        raise HttpError(409, str(exc)) from None
    audit.record(request, "node.forget", node, detail={"via": "api"})
    return Status(204, None)
