"""A download whose worker is killed mid-file resumes from the partial file after the restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from appliance.jobs import JobStatus
from models_catalog.models import HubEndpoint, LocalModel, ModelJob
from tests.models_catalog.conftest import WEIGHTS, MiB
from tests.models_catalog.helpers import Peer, ThrottledProxy
from tests.workers import WorkerProcess, wait_for


def partial_size(data: Path) -> int:
    parts = list(data.rglob("model.safetensors.part"))
    return parts[0].stat().st_size if parts else 0


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_file_then_resume_fetches_only_the_rest(
    client_data: Path, peer: Peer, peer_endpoint: HubEndpoint, proxy: ThrottledProxy, redis_db: Any
) -> None:
    peer_endpoint.url = proxy.url + "/hf"
    peer_endpoint.save()
    proxy.rate_bps = 4 * MiB  # the weights take about 6 s
    worker = WorkerProcess(f"worker@{settings.NODE_NAME}", DATA_DIR=str(client_data), DISK_RESERVE_BYTES="0").start()
    try:
        first = LocalModel.request_download("acme/tiny", endpoint=peer_endpoint)
        assert wait_for(lambda: partial_size(client_data) >= 10 * MiB, timeout=60), worker.output()
        worker.kill()
        kept = partial_size(client_data)
        assert 0 < kept < WEIGHTS

        worker.start()
        assert wait_for(lambda: ModelJob.objects.get(pk=first.pk).status == JobStatus.FAILED), worker.output()
        model = LocalModel.objects.get()
        assert model.status == LocalModel.Status.FAILED and "restarted" in model.error

        proxy.rate_bps = None
        sent_before, log_start = proxy.bytes_to_client, peer.log_size()
        second = LocalModel.request_download("acme/tiny", endpoint=peer_endpoint)
        assert wait_for(lambda: ModelJob.objects.get(pk=second.pk).status in JobStatus.TERMINAL, timeout=60)
        second.refresh_from_db()
        assert second.status == JobStatus.SUCCEEDED, second.error
        requests = [line for line in peer.requests_since(log_start) if "/resolve/" in line]
        # config.json was finished before the crash: not fetched again; the weights resumed (206).
        assert not any("/config.json " in line for line in requests), requests
        assert any("model.safetensors" in line and line.endswith(" 206") for line in requests)
        assert proxy.bytes_to_client - sent_before < WEIGHTS - kept + MiB
        assert LocalModel.objects.get().status == LocalModel.Status.READY
    finally:
        worker.stop()
