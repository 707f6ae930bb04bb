"""Downloading with huggingface_hub from another console's /hf/ endpoint into a second DATA_DIR."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.jobs import JobStatus, run_job
from models_catalog.models import HubEndpoint, LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from tests.models_catalog.conftest import WEIGHTS, MiB
from tests.models_catalog.helpers import FakeHub, Peer, ThrottledProxy

pytestmark = pytest.mark.django_db

DEFAULT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def run(job: ModelJob) -> ModelJob:
    run_job(ModelJob, job.pk, model_job_body)
    job.refresh_from_db()
    return job


def download(repo: str, endpoint: HubEndpoint | None, **kwargs: Any) -> ModelJob:
    return run(LocalModel.request_download(repo, endpoint=endpoint, enqueue=False, **kwargs))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_download_is_verified_and_ready(client_data: Path, peer: Peer, peer_endpoint: HubEndpoint) -> None:
    job = download("acme/tiny", peer_endpoint)
    assert job.status == JobStatus.SUCCEEDED, job.error
    model = LocalModel.objects.get(repo_id="acme/tiny")
    assert model.status == LocalModel.Status.READY
    assert model.source == LocalModel.Source.PEER
    assert len(model.commit) == 40
    assert sorted(model.files.values_list("path", flat=True)) == DEFAULT_FILES  # the pickle is left out
    for name in DEFAULT_FILES:
        assert sha256(model.ready_path / name) == sha256(peer.source / name)
    assert model.ready_path.is_symlink()
    assert model.ready_path.resolve().is_relative_to(client_data)
    weights = model.files.get(path="model.safetensors")
    assert weights.is_lfs and weights.sha256 == sha256(peer.source / "model.safetensors")
    assert job.progress == 1.0
    assert job.detail["bytes_done"] == job.detail["bytes_total"] == model.size_bytes
    assert job.detail["files_done"] == 4
    assert model.parameter_count == WEIGHTS // 2
    facts = model.facts()
    assert facts["architecture"] == "LlamaForCausalLM" and facts["kv_heads"] == 2 and facts["head_dim"] == 64


def test_allow_and_ignore_patterns(client_data: Path, peer_endpoint: HubEndpoint) -> None:
    job = download("acme/tiny", peer_endpoint, allow_patterns=["*.json"], ignore_patterns=["tokenizer*"])
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert list(LocalModel.objects.get().files.values_list("path", flat=True)) == ["config.json"]


def test_download_through_huggingface_hub_snapshot_download(peer: Peer, tmp_path: Path) -> None:
    """Anyone with a key can point huggingface_hub at the console (HF_ENDPOINT-style)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    folder = snapshot_download("acme/tiny", endpoint=peer.url + "/hf", token=peer.token, local_dir=tmp_path / "snap")
    names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    assert names == ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"]
    single = hf_hub_download(
        "acme/tiny", "config.json", endpoint=peer.url + "/hf", token=peer.token, cache_dir=tmp_path
    )
    assert Path(single).read_bytes() == (peer.source / "config.json").read_bytes()


def test_connection_dropped_mid_file_is_resumed(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint, proxy: ThrottledProxy
) -> None:
    peer_endpoint.url = proxy.url + "/hf"
    peer_endpoint.save()
    proxy.cut_after = 16 * MiB  # inside model.safetensors
    start = peer.log_size()
    job = download("acme/tiny", peer_endpoint)
    assert job.status == JobStatus.SUCCEEDED, job.error
    weights = LocalModel.objects.get().ready_path / "model.safetensors"
    assert sha256(weights) == sha256(peer.source / "model.safetensors")
    assert any("model.safetensors" in line and line.endswith(" 206") for line in peer.requests_since(start))


def test_source_gone_fails_clearly_and_keeps_partial_for_resume(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint, proxy: ThrottledProxy
) -> None:
    peer_endpoint.url = proxy.url + "/hf"
    peer_endpoint.save()
    proxy.cut_after = 16 * MiB
    proxy.down_after_cut = True
    job = download("acme/tiny", peer_endpoint)
    assert job.status == JobStatus.FAILED
    assert "connection problem" in job.error or "ended early" in job.error
    model = LocalModel.objects.get()
    assert model.status == LocalModel.Status.FAILED and model.error
    assert not model.ready_path.exists()
    partial = next(client_data.rglob("model.safetensors.part"))
    assert 0 < partial.stat().st_size < WEIGHTS
    partial_size = partial.stat().st_size
    # The source comes back: the resume fetches only what is missing.
    proxy.down = False
    before = proxy.bytes_to_client
    job = run(LocalModel.request_download("acme/tiny", endpoint=peer_endpoint, enqueue=False))
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert proxy.bytes_to_client - before < WEIGHTS - partial_size + MiB
    assert sha256(model.ready_path / "model.safetensors") == sha256(peer.source / "model.safetensors")


def test_corrupted_byte_is_detected_and_nothing_published(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint
) -> None:
    served = next((peer.base / "data" / "models").rglob("snapshots/*/model.safetensors"))
    original = served.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    served.write_bytes(bytes(damaged))
    try:
        job = download("acme/tiny", peer_endpoint)
    finally:
        served.write_bytes(original)
    assert job.status == JobStatus.FAILED
    assert "model.safetensors: sha256" in job.error and "does not match" in job.error
    model = LocalModel.objects.get()
    assert model.status == LocalModel.Status.FAILED
    assert not model.ready_path.exists()
    assert not list(client_data.rglob("model.safetensors*"))  # the bad copy is not kept for a resume
    # With the source repaired, a retry succeeds.
    assert run(LocalModel.request_download("acme/tiny", endpoint=peer_endpoint, enqueue=False)).status == "succeeded"


def test_unknown_repo_is_a_clear_404(client_data: Path, peer_endpoint: HubEndpoint) -> None:
    job = download("acme/nothing", peer_endpoint)
    assert job.status == JobStatus.FAILED
    assert "no such repository" in job.error and "404" in job.error


def test_missing_token_is_a_clear_401(client_data: Path, peer: Peer) -> None:
    endpoint = HubEndpoint.objects.create(name="no token", url=peer.url + "/hf", kind=HubEndpoint.Kind.PEER)
    job = download("acme/tiny", endpoint)
    assert job.status == JobStatus.FAILED
    assert "401" in job.error and "token" in job.error


def test_mirror_answering_html_is_refused(client_data: Path) -> None:
    fake = FakeHub("html")
    try:
        endpoint = HubEndpoint.objects.create(name="proxy page", url=fake.url, kind=HubEndpoint.Kind.MIRROR)
        job = download("acme/tiny", endpoint)
    finally:
        fake.stop()
    assert job.status == JobStatus.FAILED
    assert "did not answer like a Hugging Face hub" in job.error
    assert not any(client_data.rglob("*.json")) if client_data.exists() else True


def test_hostile_file_names_write_nothing_outside(client_data: Path, tmp_path: Path) -> None:
    fake = FakeHub("hostile")
    try:
        endpoint = HubEndpoint.objects.create(name="hostile", url=fake.url, kind=HubEndpoint.Kind.MIRROR)
        job = download("evil/model", endpoint)
    finally:
        fake.stop()
    assert job.status == JobStatus.FAILED
    assert "Refusing the file name '../../../escape.json'" in job.error
    assert not list(tmp_path.rglob("escape.json"))


@pytest.mark.parametrize(
    "repo_id", ["../etc", "/etc/passwd", "a/../../b", "..%2fetc", "a/b/c", ".hidden/x", "a\\b", ""]
)
def test_repo_ids_that_leave_the_data_directory_are_refused(client_data: Path, repo_id: str) -> None:
    from models_catalog.layout import UnsafePath

    with pytest.raises(UnsafePath):
        LocalModel.request_download(repo_id, enqueue=False)
    assert not LocalModel.objects.exists()


def test_full_disk_is_refused_before_fetching(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint, settings: Any
) -> None:
    usage = os.statvfs(client_data.parent)
    settings.DISK_RESERVE_BYTES = usage.f_bavail * usage.f_frsize - 1024 * 1024  # leaves 1 MiB usable
    start = peer.log_size()
    job = download("acme/tiny", peer_endpoint)
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("SourceError: Not enough disk space")
    assert not any("resolve" in line for line in peer.requests_since(start))


def test_second_download_of_a_ready_model_is_refused(client_data: Path, peer_endpoint: HubEndpoint) -> None:
    from models_catalog.models import JobConflict

    assert download("acme/tiny", peer_endpoint).status == JobStatus.SUCCEEDED
    with pytest.raises(JobConflict):
        LocalModel.request_download("acme/tiny", endpoint=peer_endpoint, enqueue=False)
