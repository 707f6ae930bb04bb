"""The Nodes page: the boxes of the appliance, what runs on each, join tokens, draining."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from appliance import audit
from appliance.roles import requires
from nodes.models import JoinToken, Node, NodeAlive
from nodes.registry import nodes_with_workload

REVEAL = "nodes:join-token"  # the session key holding a new join token until its page is shown once


@require_GET
@requires("node.view")
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "nodes/list.html", {
        "nodes": nodes_with_workload(), "tokens": JoinToken.objects.select_related("created_by")[:10], "nav": "nodes",
    })  # fmt: skip


@require_POST
@requires("node.manage")
def create_join_token(request: HttpRequest) -> HttpResponse:
    token, raw = JoinToken.issue(request.user)
    audit.record(request, "node.join_token", token, detail={"expires_at": token.expires_at.isoformat()})
    request.session[REVEAL] = raw
    return redirect("nodes:join-reveal", join_token_id=token.pk)


@never_cache
@require_GET
@requires("node.manage")
def join_reveal(request: HttpRequest, join_token_id: int) -> HttpResponse:
    """The new token, once (post/redirect/get: a reload shows it no more and makes no other)."""
    token = get_object_or_404(JoinToken, pk=join_token_id)
    raw = request.session.pop(REVEAL, None)
    return render(request, "nodes/join.html", {
        "token": token, "secret": raw, "console_url": request.build_absolute_uri("/").rstrip("/"), "nav": "nodes",
    })  # fmt: skip


@require_POST
@requires("node.manage", per_action={"drain": "node.manage", "resume": "node.manage", "forget": "node.manage"})
def act(request: HttpRequest, node_id: int, action: str) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    if action == "drain":
        node.set_draining(True)
        text = _("%(node)s is draining: it gets no new replicas, and replicas placed on any box move to other boxes.")
        messages.success(request, text % {"node": node.name})
    elif action == "resume":
        node.set_draining(False)
        messages.success(request, _("%(node)s takes new replicas again.") % {"node": node.name})
    elif action == "forget":
        try:
            node.forget()
        except NodeAlive as exc:
            messages.error(request, str(exc))
            return redirect("nodes:list")
        messages.success(request, _("%(node)s forgotten.") % {"node": node.name})
    else:
        return HttpResponse(status=404)
    audit.record(request, f"node.{action}", node)
    return redirect("nodes:list")
