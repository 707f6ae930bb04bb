"""Update checks, updates that move only changed files, imports, verification and deletion."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.jobs import JobStatus, run_job
from models_catalog.importer import ImportRefused
from models_catalog.models import USAGE_CHECKS, HubEndpoint, JobConflict, LocalModel, ModelJob
from models_catalog.tasks import check_updates, model_job_body
from tests.models_catalog.helpers import Peer, make_model_dir

pytestmark = pytest.mark.django_db


def run(job: ModelJob) -> ModelJob:
    run_job(ModelJob, job.pk, model_job_body)
    job.refresh_from_db()
    return job


def test_new_upstream_commit_is_detected_and_updated_moving_only_the_changed_file(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint
) -> None:
    assert run(LocalModel.request_download("acme/tiny", endpoint=peer_endpoint, enqueue=False)).status == "succeeded"
    model = LocalModel.objects.get()
    old_commit, old_snapshot = model.commit, model.ready_path.resolve()
    weights_inode = (model.ready_path / "model.safetensors").stat().st_ino
    assert check_updates.apply().result == {"checked": 1, "outdated": 0, "failed": 0}

    # Upstream changes one file: the peer re-imports its directory and gets a new commit.
    tokenizer = peer.source / "tokenizer.json"
    original = tokenizer.read_text()
    tokenizer.write_text(json.dumps({"version": "1.1", "model": {"vocab": {"a": 0, "b": 1}}}))
    try:
        peer.manage("import_model", str(peer.source), "acme/tiny", "--replace")
        assert check_updates.apply().result == {"checked": 1, "outdated": 1, "failed": 0}
        model.refresh_from_db()
        assert model.status == LocalModel.Status.OUTDATED
        assert model.changed_files == [{"path": "tokenizer.json", "change": "modified"}]
        assert model.upstream_commit != old_commit

        start = peer.log_size()
        job = run(model.start_job(ModelJob.Kind.UPDATE, enqueue=False))
        assert job.status == JobStatus.SUCCEEDED, job.error
        fetched = [line for line in peer.requests_since(start) if "/resolve/" in line]
        assert len(fetched) == 1 and "tokenizer.json" in fetched[0]
        model.refresh_from_db()
        assert model.status == LocalModel.Status.READY
        assert model.commit == model.upstream_commit != old_commit
        assert json.loads((model.ready_path / "tokenizer.json").read_text())["version"] == "1.1"
        # The unchanged weights were hard-linked, not copied; the old snapshot is gone.
        assert (model.ready_path / "model.safetensors").stat().st_ino == weights_inode
        assert not old_snapshot.exists()
    finally:
        tokenizer.write_text(original)
        peer.manage("import_model", str(peer.source), "acme/tiny", "--replace")


def test_failed_update_leaves_the_ready_copy_untouched(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint
) -> None:
    assert run(LocalModel.request_download("acme/tiny", endpoint=peer_endpoint, enqueue=False)).status == "succeeded"
    model = LocalModel.objects.get()
    before = {p.name: p.read_bytes() for p in model.ready_path.iterdir()}
    LocalModel.objects.filter(pk=model.pk).update(status=LocalModel.Status.OUTDATED)
    peer_endpoint.url = peer.url + "/not-a-hub"
    peer_endpoint.save()
    job = run(model.start_job(ModelJob.Kind.UPDATE, enqueue=False))
    assert job.status == JobStatus.FAILED
    model.refresh_from_db()
    assert model.status == LocalModel.Status.OUTDATED and model.error
    assert {p.name: p.read_bytes() for p in model.ready_path.iterdir()} == before


def test_import_from_directory(client_data: Path, tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "usb" / "llama", weights_bytes=1024 * 1024)
    job = run(LocalModel.request_import(str(source), "local/llama", enqueue=False))
    assert job.status == JobStatus.SUCCEEDED, job.error
    model = LocalModel.objects.get()
    assert model.source == LocalModel.Source.IMPORTED and model.status == LocalModel.Status.READY
    assert (model.ready_path / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert (source / "model.safetensors").exists()  # copied, not moved
    assert not (model.ready_path / "model.safetensors").samefile(source / "model.safetensors")


def test_reimport_of_same_content_gives_the_same_commit(client_data: Path, tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "m", weights_bytes=64 * 1024)
    run(LocalModel.request_import(str(source), "local/m", enqueue=False))
    first = LocalModel.objects.get().commit
    run(LocalModel.request_import(str(source), "local/m", enqueue=False, replace=True))
    assert LocalModel.objects.get().commit == first


@pytest.mark.parametrize("case", ["symlink_out", "symlink_dir", "no_config", "relative", "missing", "bad_config"])
def test_import_refuses_bad_directories(client_data: Path, tmp_path: Path, case: str) -> None:
    source = make_model_dir(tmp_path / "m", weights_bytes=64 * 1024)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    path = str(source)
    if case == "symlink_out":
        (source / "extra.json").symlink_to(secret)
    elif case == "symlink_dir":
        (source / "sub").symlink_to(tmp_path)
    elif case == "no_config":
        (source / "config.json").unlink()
    elif case == "relative":
        path = os.path.relpath(source)
    elif case == "missing":
        path = str(tmp_path / "nowhere")
    if case == "bad_config":
        (source / "config.json").write_text("{not json")
        job = run(LocalModel.request_import(path, "local/m", enqueue=False))
        assert job.status == JobStatus.FAILED and "config.json is not valid JSON" in job.error
        assert not LocalModel.objects.get().ready_path.exists()
        return
    with pytest.raises(ImportRefused):
        LocalModel.request_import(path, "local/m", enqueue=False)
    assert not LocalModel.objects.exists()
    assert not list(Path(client_data).rglob("secret.txt")) if Path(client_data).exists() else True


def test_verify_detects_a_flipped_byte(client_data: Path, tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "m", weights_bytes=256 * 1024)
    run(LocalModel.request_import(str(source), "local/m", enqueue=False))
    model = LocalModel.objects.get()
    assert run(model.start_job(ModelJob.Kind.VERIFY, enqueue=False)).status == JobStatus.SUCCEEDED
    weights = model.ready_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    job = run(model.start_job(ModelJob.Kind.VERIFY, enqueue=False))
    assert job.status == JobStatus.FAILED
    assert "model.safetensors: content does not match" in job.error
    model.refresh_from_db()
    assert model.status == LocalModel.Status.FAILED


def test_delete_frees_the_disk_and_is_refused_while_in_use(client_data: Path, tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "m", weights_bytes=256 * 1024)
    run(LocalModel.request_import(str(source), "local/m", enqueue=False))
    model = LocalModel.objects.get()
    directory = model.directory
    USAGE_CHECKS.append(lambda m: ["deployment chat-1"] if m.repo_id == "local/m" else [])
    try:
        with pytest.raises(JobConflict, match="deployment chat-1"):
            model.request_delete()
    finally:
        USAGE_CHECKS.pop()
    assert directory.exists()
    job = model.request_delete()
    assert LocalModel.objects.get().status == LocalModel.Status.DELETING
    assert run(job).status == JobStatus.SUCCEEDED
    assert not directory.exists()
    assert not LocalModel.objects.exists()
    assert ModelJob.objects.get(pk=job.pk).repo_id == "local/m"


def test_one_job_at_a_time_per_model(client_data: Path, tmp_path: Path) -> None:
    source = make_model_dir(tmp_path / "m", weights_bytes=64 * 1024)
    run(LocalModel.request_import(str(source), "local/m", enqueue=False))
    model = LocalModel.objects.get()
    model.start_job(ModelJob.Kind.VERIFY, enqueue=False)
    with pytest.raises(JobConflict):
        model.start_job(ModelJob.Kind.VERIFY, enqueue=False)


def test_memory_estimate(client_data: Path, tmp_path: Path) -> None:
    from models_catalog.memory import estimate

    source = make_model_dir(tmp_path / "m", weights_bytes=1024 * 1024)
    run(LocalModel.request_import(str(source), "local/m", enqueue=False))
    facts = LocalModel.objects.get().facts()
    result = estimate(facts, context_length=2048, concurrency=4)
    # 2 (K,V) × 2 layers × 2 KV heads × 64 head dim × 2 bytes = 1024 bytes per token
    assert result["kv_bytes_per_token"] == 1024
    assert result["kv_cache_bytes"] == 1024 * 2048 * 4
    assert result["weights_bytes"] == (source / "model.safetensors").stat().st_size
    assert result["total_bytes"] > result["weights_bytes"] + result["kv_cache_bytes"]
    with pytest.raises(ValueError):
        estimate(facts, context_length=0, concurrency=1)


def test_update_check_failure_is_recorded(client_data: Path, peer: Peer, peer_endpoint: HubEndpoint) -> None:
    run(LocalModel.request_download("acme/tiny", endpoint=peer_endpoint, enqueue=False))
    HubEndpoint.objects.filter(pk=peer_endpoint.pk).update(url="http://127.0.0.1:9/hf")
    result = check_updates.apply().result
    assert result["failed"] == 1
    model = LocalModel.objects.get()
    assert model.status == LocalModel.Status.READY and "Update check failed" in model.error


def test_token_is_encrypted_at_rest(db: Any) -> None:
    endpoint = HubEndpoint(name="hub", url="https://huggingface.co")
    endpoint.set_token("hf_secret_value_123")
    endpoint.save()
    stored = HubEndpoint.objects.values_list("token_sealed", flat=True).get()
    assert "hf_secret_value_123" not in stored
    assert HubEndpoint.objects.get().token() == "hf_secret_value_123"
