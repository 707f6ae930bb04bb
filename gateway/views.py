"""The playground's page and its chat (see gateway.playground)."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST
from pydantic import ValidationError

from appliance import audit
from appliance.roles import requires
from gateway import playground


@require_GET
@requires("playground.use")
def page(request: HttpRequest) -> HttpResponse:
    departments = list(playground.departments_for(request.user))
    choices = {str(d.pk): playground.deployments_of(d) for d in departments}
    return render(request, "gateway/playground.html", {
        "departments": departments, "choices": choices, "gateway_url": request.build_absolute_uri("/v1"),
        "nav": "playground",
    })  # fmt: skip


def _refusal(status: int, message: str, param: str | None = None) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "param": param}}, status=status)


@require_POST
@requires("playground.use")
def chat(request: HttpRequest) -> HttpResponse:
    try:
        asked = playground.ChatIn.model_validate_json(request.body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return _refusal(400, _("%(field)s: %(problem)s") % {"field": where, "problem": first["msg"]}, where)
    department = playground.departments_for(request.user).filter(pk=asked.department).first()
    if department is None:
        return _refusal(404, _("No such department of yours."), "department")
    if asked.deployment not in playground.deployments_of(department):
        return _refusal(404, _("%(department)s may not use “%(deployment)s”.")
                        % {"department": department.name, "deployment": asked.deployment}, "deployment")  # fmt: skip
    body = asked.body()
    audit.record(request, "playground.chat", department, detail={"deployment": asked.deployment})
    response = StreamingHttpResponse(playground.stream(department, body), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    response["X-Snippet"] = json.dumps(playground.snippet(body, request.build_absolute_uri("/v1")))
    return response
