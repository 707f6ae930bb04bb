"""The Models pages and API: forms with errors next to fields, one job per click, progress, roles."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.test import Client
from django.urls import reverse

from appliance.jobs import run_job
from appliance.models import ApiToken, AuditEvent
from models_catalog.models import HubEndpoint, LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from tests.models_catalog.helpers import make_model_dir

pytestmark = pytest.mark.django_db


@pytest.fixture
def ready_model(client_data: Path, tmp_path: Path) -> LocalModel:
    source = make_model_dir(tmp_path / "src", weights_bytes=128 * 1024)
    job = LocalModel.request_import(str(source), "acme/tiny", enqueue=False)
    run_job(ModelJob, job.pk, model_job_body)
    return LocalModel.objects.get()


@pytest.fixture
def no_broker() -> Any:
    with mock.patch("appliance.celery.app.send_task") as send:
        yield send


def test_list_search_and_detail(admin_client: Client, ready_model: LocalModel) -> None:
    html = admin_client.get(reverse("models_catalog:list")).content.decode()
    assert "acme/tiny" in html and "Ready" in html
    assert "acme/tiny" not in admin_client.get(reverse("models_catalog:list"), {"q": "qwen"}).content.decode()
    page = admin_client.get(reverse("models_catalog:detail", args=[ready_model.pk])).content.decode()
    assert "LlamaForCausalLM" in page and "model.safetensors" in page and "GPU memory needed" in page


def test_list_pages_keep_the_search(admin_client: Client) -> None:
    LocalModel.objects.bulk_create([LocalModel(repo_id=f"acme/m{n:02}") for n in range(51)] + [LocalModel(
        repo_id="other/x")])  # fmt: skip
    first = admin_client.get(reverse("models_catalog:list"), {"q": "acme"}).content.decode()
    assert 'href="?q=acme&amp;page=2"' in first and "Page 1 of 2" in first
    second = admin_client.get(reverse("models_catalog:list"), {"q": "acme", "page": 2}).content.decode()
    assert 'href="?q=acme&amp;page=1"' in second and "acme/m50" in second and "other/x" not in second
    unfiltered = admin_client.get(reverse("models_catalog:list")).content.decode()
    assert 'href="?page=2"' in unfiltered


def test_estimate_panel(admin_client: Client, ready_model: LocalModel) -> None:
    url = reverse("models_catalog:estimate", args=[ready_model.pk])
    html = admin_client.get(url, {"context_length": 2048, "concurrency": 4}).content.decode()
    assert "1024 bytes per token" in html
    bad = admin_client.get(url, {"context_length": 0, "concurrency": "x"})
    assert bad.context["estimate_form"].errors.keys() == {"context_length", "concurrency"}


def test_download_form_errors_next_to_fields(admin_client: Client, no_broker: Any) -> None:
    response = admin_client.post(
        reverse("models_catalog:download"), {"repo_id": "../etc", "revision": "main", "allow_patterns": "../*"}
    )
    assert response.status_code == 400
    assert set(response.context["download"].errors) == {"repo_id", "allow_patterns"}
    assert not LocalModel.objects.exists()
    no_broker.assert_not_called()


def test_download_click_creates_one_job_and_shows_progress(
    admin_client: Client, no_broker: Any, django_capture_on_commit_callbacks: Any
) -> None:
    form = {"repo_id": "acme/new", "revision": "main"}
    with django_capture_on_commit_callbacks(execute=True):
        first = admin_client.post(reverse("models_catalog:download"), form)
        assert first.status_code == 302
        second = admin_client.post(reverse("models_catalog:download"), form)  # a double click
    assert second.status_code == 400
    assert "already" in str(second.context["download"].errors["repo_id"])
    assert ModelJob.objects.count() == 1
    no_broker.assert_called_once()
    job = ModelJob.objects.get()
    job.claim("w")
    job.report(0.42, bytes_done=42, bytes_total=100, files_done=1, files_total=3, speed_bps=1000, eta_seconds=5)
    fragment = admin_client.get(reverse("models_catalog:job-progress", args=[job.pk])).content.decode()
    assert 'value="42"' in fragment and "hx-trigger" in fragment and "1 of 3 files" in fragment
    assert AuditEvent.objects.filter(action="model.download").count() == 1


def test_cancel_from_the_page(admin_client: Client, no_broker: Any) -> None:
    admin_client.post(reverse("models_catalog:download"), {"repo_id": "acme/new", "revision": "main"})
    job = ModelJob.objects.get()
    admin_client.post(reverse("models_catalog:job-cancel", args=[job.pk]))
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert LocalModel.objects.get().status == LocalModel.Status.FAILED  # resumable


def test_import_form_refuses_a_relative_path(admin_client: Client) -> None:
    response = admin_client.post(reverse("models_catalog:import"), {"directory": "usb/model", "repo_id": "a/b"})
    assert response.status_code == 400
    assert "directory" in response.context["import_form"].errors


def test_viewer_cannot_act(viewer_client: Client, ready_model: LocalModel) -> None:
    for action in ("delete", "verify", "update"):
        url = reverse("models_catalog:act", args=[ready_model.pk, action])
        assert viewer_client.post(url).status_code == 403
    assert not ModelJob.objects.exclude(kind="import").exists()
    assert AuditEvent.objects.filter(outcome="denied").count() == 3


def test_endpoint_token_is_never_shown_again(admin_client: Client) -> None:
    admin_client.post(
        reverse("models_catalog:endpoint-create"),
        {"name": "hub", "url": "https://huggingface.co", "kind": "hub", "token": "hf_supersecret"},
    )
    endpoint = HubEndpoint.objects.get()
    assert endpoint.token() == "hf_supersecret"
    html = admin_client.get(reverse("models_catalog:endpoints")).content.decode()
    assert "hf_supersecret" not in html and "set" in html
    event = AuditEvent.objects.get(action="hub_endpoint.create")
    assert "hf_supersecret" not in str(event.detail)


def test_endpoint_form_refuses_bad_url(admin_client: Client) -> None:
    response = admin_client.post(
        reverse("models_catalog:endpoint-create"), {"name": "x", "url": "javascript:alert(1)", "kind": "hub"}
    )
    assert response.status_code == 400 and "url" in response.context["form"].errors


def test_api_models(admin_user: Any, client: Client, ready_model: LocalModel, no_broker: Any) -> None:
    _, raw = ApiToken.issue(admin_user, "t")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    rows = client.get("/api/v1/models", **auth).json()
    assert [r["repo_id"] for r in rows] == ["acme/tiny"]
    detail = client.get(f"/api/v1/models/{ready_model.pk}", **auth).json()
    assert detail["facts"]["kv_heads"] == 2 and len(detail["files"]) == 5
    estimate = client.get(f"/api/v1/models/{ready_model.pk}/estimate?context_length=1024&concurrency=2", **auth)
    assert estimate.json()["kv_cache_bytes"] == 1024 * 1024 * 2
    created = client.post("/api/v1/models", {"repo_id": "acme/other"}, content_type="application/json", **auth)
    assert created.status_code == 202 and created.json()["kind"] == "download"
    again = client.post("/api/v1/models", {"repo_id": "acme/other"}, content_type="application/json", **auth)
    assert again.status_code == 409
    bad = client.post("/api/v1/models", {"repo_id": "../../etc"}, content_type="application/json", **auth)
    assert bad.status_code == 422
    job_id = created.json()["id"]
    assert client.get(f"/api/v1/model-jobs/{job_id}", **auth).json()["status"] == "queued"
    assert client.post(f"/api/v1/model-jobs/{job_id}/cancel", **auth).json()["status"] == "cancelled"
    assert client.delete(f"/api/v1/models/{ready_model.pk}", **auth).status_code == 202


def test_importing_etc_says_it_is_not_a_model_directory(admin_client: Client, client_data: Path) -> None:
    response = admin_client.post(reverse("models_catalog:import"), {"directory": "/etc", "repo_id": "acme/etc"})
    assert response.status_code == 400
    assert "/etc is not a model directory: it has no config.json at its top." in response.content.decode()
    assert not LocalModel.objects.exists()


def test_importing_under_a_taken_name_asks_to_replace_and_never_under_a_deployment(
    admin_client: Client, ready_model: LocalModel, tmp_path: Path, no_broker: Any
) -> None:
    from models_catalog.models import USAGE_CHECKS

    other = make_model_dir(tmp_path / "other", weights_bytes=64 * 1024)
    form = {"directory": str(other), "repo_id": "acme/tiny"}
    response = admin_client.post(reverse("models_catalog:import"), form)
    assert response.status_code == 400
    assert "acme/tiny exists already: import under another name, or choose to replace its files." in (
        response.content.decode())  # fmt: skip
    assert not ModelJob.objects.filter(kind="import").exclude(status="succeeded").exists()
    USAGE_CHECKS.append(lambda m: ["deployment chat-1"] if m.repo_id == "acme/tiny" else [])
    try:
        response = admin_client.post(reverse("models_catalog:import"), form | {"replace": "on"})
        assert response.status_code == 400 and "is used by deployment chat-1" in response.content.decode()
    finally:
        USAGE_CHECKS.pop()
    assert ModelJob.objects.filter(kind="import").count() == 1  # the first import only
    response = admin_client.post(reverse("models_catalog:import"), form | {"replace": "on"})
    assert response.status_code == 302 and ModelJob.objects.filter(kind="import").count() == 2


def test_a_download_the_hub_could_not_answer_says_what_to_do(admin_client: Client, client_data: Path) -> None:
    from tests.models_catalog.helpers import free_port

    endpoint = HubEndpoint.objects.create(name="gone", url=f"http://127.0.0.1:{free_port()}")
    job = LocalModel.request_download("acme/far", endpoint=endpoint, enqueue=False)
    run_job(ModelJob, job.pk, model_job_body)
    model = LocalModel.objects.get(repo_id="acme/far")
    assert model.status == LocalModel.Status.FAILED
    page = admin_client.get(reverse("models_catalog:detail", args=[model.pk])).content.decode()
    assert "The hub could not be reached from this appliance." in page
    assert reverse("models_catalog:endpoints") in page and "#imp-title" in page


def test_a_finished_download_shows_its_bar_at_100_after_the_page_reloads(admin_client: Client,
                                                                         ready_model: LocalModel) -> None:  # fmt: skip
    """The page reloads itself when the job ends; the bar then shows where it ended, not the 99 % it
    last polled (the last percent is the verification and the swap)."""
    job = ready_model.jobs.get()
    page = admin_client.get(reverse("models_catalog:detail", args=[ready_model.pk])).content.decode()
    assert '<progress max="100" value="100"' in page and "Succeeded" in page
    from datetime import timedelta

    from django.utils import timezone

    ModelJob.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(hours=1))
    page = admin_client.get(reverse("models_catalog:detail", args=[ready_model.pk])).content.decode()
    assert '<progress max="100"' not in page  # an old job's bar is not shown
