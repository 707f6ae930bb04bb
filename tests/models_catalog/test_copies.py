"""Copying a model to another box over the source box's relay (the real ``manage.py relay`` serving
``/hf/`` from the table its node publishes), with huggingface_hub underneath. Box A is this test's
first data directory and NODE_NAME; box B is a second data directory and another node name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.utils import timezone

from appliance.jobs import JobStatus, run_job
from models_catalog import copies
from models_catalog.mirror import sync_token
from models_catalog.models import JobConflict, LocalModel, ModelCopy, ModelJob
from models_catalog.tasks import model_job_body
from nodes.models import Node
from tests.gateway.helpers import RelayProcess
from tests.models_catalog.helpers import make_model_dir

pytestmark = pytest.mark.django_db

BOX_B = "copies-box-b"


@pytest.fixture
def box_a(settings: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A ready model on box A, box A's relay serving it, and both boxes in the registry."""
    settings.DATA_DIR = tmp_path / "box-a"
    settings.DISK_RESERVE_BYTES = 0
    source = make_model_dir(tmp_path / "src", weights_bytes=3 * 1024 * 1024)
    run_job(ModelJob, LocalModel.request_import(str(source), "acme/tiny", enqueue=False).pk, model_job_body)
    model = LocalModel.objects.get()
    assert copies.publish_table(settings.NODE_NAME)
    relay = RelayProcess(settings.DATA_DIR, settings.NODE_NAME).start()
    settings.RELAY_PORT = relay.port
    now = timezone.now()
    Node.objects.create(name=settings.NODE_NAME, address="127.0.0.1", last_heartbeat=now)
    Node.objects.create(name=BOX_B, address="127.0.0.2", last_heartbeat=now)
    try:
        yield {"model": model, "relay": relay, "data": settings.DATA_DIR, "home": settings.NODE_NAME}
    finally:
        relay.stop()


def on_box_b(settings: Any, tmp_path: Path) -> Path:
    settings.NODE_NAME, settings.DATA_DIR = BOX_B, tmp_path / "box-b"
    return settings.DATA_DIR


def run_copy(model: LocalModel) -> ModelJob:
    copies.request_copy(model, BOX_B)
    job = ModelJob.objects.get(kind=ModelJob.Kind.SYNC, node=BOX_B, status=JobStatus.QUEUED)
    run_job(ModelJob, job.pk, model_job_body)
    job.refresh_from_db()
    return job


def test_a_model_is_copied_to_another_box_with_progress(
    box_a: dict, settings: Any, tmp_path: Path, admin_client: Any
) -> None:
    model = box_a["model"]
    assert not model.held_on(BOX_B)
    on_box_b(settings, tmp_path)
    job = run_copy(model)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.progress == 1.0
    assert job.detail["bytes_done"] == job.detail["bytes_total"] == model.size_bytes
    assert job.detail["files_done"] == job.detail["files_total"] == model.files.count()
    copy = ModelCopy.objects.get(model=model, node=BOX_B)
    assert (copy.status, copy.commit, copy.source_node) == ("ready", model.commit, box_a["home"])
    assert model.held_on(BOX_B)
    for file in model.files.all():  # box B's ready copy, byte for byte
        here = (model.ready_path / file.path).read_bytes()
        there = (box_a["data"] / model.ready_path.relative_to(settings.DATA_DIR) / file.path).read_bytes()
        assert here == there and (not file.is_lfs or hashlib.sha256(here).hexdigest() == file.sha256)
    assert "acme/tiny" in copies.served_here(BOX_B)  # box B now serves it to others too
    page = admin_client.get(f"/models/{model.pk}/").content.decode()
    assert "Copies on other boxes" in page and f'{BOX_B} <span class="badge ok">Ready</span>' in page
    assert f"Copy to another box → {BOX_B}" in page
    api = admin_client.get(f"/api/v1/models/{model.pk}").json()["copies"]
    assert api == [{"node": BOX_B, "status": "ready", "commit": model.commit, "current": True, "error": ""}]
    # Asking again does nothing: it is there.
    assert copies.request_copy(model, BOX_B).status == "ready"
    assert ModelJob.objects.filter(kind=ModelJob.Kind.SYNC).count() == 1


def test_the_relay_serves_models_only_with_the_sync_token(box_a: dict) -> None:
    base = box_a["relay"].url + "/hf/api/models/acme/tiny"
    assert httpx.get(base, timeout=5).status_code == 401
    assert httpx.get(base, headers={"Authorization": "Bearer sync_forged"}, timeout=5).status_code == 401
    good = {"Authorization": f"Bearer {sync_token()}"}
    assert httpx.get(base, headers=good, timeout=5).json()["sha"] == box_a["model"].commit
    missing = httpx.get(box_a["relay"].url + "/hf/api/models/acme/other", headers=good, timeout=5)
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "RepoNotFound")
    assert httpx.post(base, headers=good, timeout=5).status_code == 405
    url = box_a["relay"].url + f"/hf/acme/tiny/resolve/{box_a['model'].commit}/config.json"
    head = httpx.head(url, headers=good, timeout=5)
    size = (box_a["model"].ready_path / "config.json").stat().st_size
    assert head.status_code == 200 and head.headers["Content-Length"] == str(size) and head.headers["ETag"]
    part = httpx.get(url, headers={**good, "Range": "bytes=2-5"}, timeout=5)
    assert part.status_code == 206 and part.content == (box_a["model"].ready_path / "config.json").read_bytes()[2:6]


def test_a_copy_whose_source_is_damaged_fails_and_leaves_the_model_ready(
    box_a: dict, settings: Any, tmp_path: Path
) -> None:
    model = box_a["model"]
    weights = model.ready_path / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    on_box_b(settings, tmp_path)
    job = run_copy(model)
    assert job.status == JobStatus.FAILED and "sha256" in job.error
    copy = ModelCopy.objects.get(model=model, node=BOX_B)
    assert copy.status == "failed" and "sha256" in copy.error
    assert not model.held_on(BOX_B) and not model.ready_path.exists()  # nothing published on box B
    model.refresh_from_db()
    assert model.status == "ready"  # only the copy failed


def test_a_copy_with_no_box_to_copy_from_fails_clearly(box_a: dict, settings: Any, tmp_path: Path) -> None:
    box_a["relay"].stop()  # box A's relay is gone: its address answers nothing
    on_box_b(settings, tmp_path)
    job = run_copy(box_a["model"])
    assert job.status == JobStatus.FAILED and "connection" in job.error.lower()
    Node.objects.filter(name=box_a["home"]).update(state=Node.State.UNREACHABLE)
    job = run_copy(box_a["model"])
    assert job.status == JobStatus.FAILED and "No ready box holds acme/tiny" in job.error


def test_a_model_that_is_not_ready_is_not_copied(box_a: dict) -> None:
    LocalModel.objects.filter(pk=box_a["model"].pk).update(status=LocalModel.Status.DOWNLOADING)
    with pytest.raises(JobConflict, match="not ready"):
        copies.request_copy(box_a["model"], BOX_B)
    assert not ModelCopy.objects.exists()


def test_deleting_a_model_removes_its_copy_on_each_box(box_a: dict, settings: Any, tmp_path: Path) -> None:
    from unittest import mock

    model = box_a["model"]
    home = settings.DATA_DIR
    on_box_b(settings, tmp_path)
    assert run_copy(model).status == JobStatus.SUCCEEDED
    copy_dir = model.directory
    assert (copy_dir / "current").exists()
    settings.NODE_NAME, settings.DATA_DIR = box_a["home"], home  # the model's own box deletes it
    with mock.patch("models_catalog.tasks.drop_copy.apply_async") as send:
        job = model.request_delete()
        run_job(ModelJob, job.pk, model_job_body)
    assert not model.directory.exists() and not LocalModel.objects.filter(pk=model.pk).exists()
    send.assert_called_once_with(args=["acme/tiny"], queue=f"node.{BOX_B}")
    settings.DATA_DIR = tmp_path / "box-b"  # box B's worker runs what was sent to its queue
    from models_catalog.tasks import drop_copy

    drop_copy("acme/tiny")
    assert not copy_dir.exists()
