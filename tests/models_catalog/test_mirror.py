"""The /hf/ endpoint through Django's test client: auth, routing, metadata, Range, bad paths."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from appliance.jobs import run_job
from appliance.models import ApiToken
from models_catalog.models import LocalModel, ModelJob
from models_catalog.tasks import model_job_body
from tests.models_catalog.helpers import make_model_dir

pytestmark = pytest.mark.django_db


def content(response: Any) -> bytes:
    """The body of a streamed response (the endpoint streams from an async iterator)."""

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)()


@pytest.fixture
def served(client_data: Path, tmp_path: Path, admin_user: Any) -> dict[str, Any]:
    source = make_model_dir(tmp_path / "src", weights_bytes=256 * 1024)
    job = LocalModel.request_import(str(source), "acme/tiny", enqueue=False)
    run_job(ModelJob, job.pk, model_job_body)
    _, raw = ApiToken.issue(admin_user, "pull")
    return {"source": source, "auth": {"HTTP_AUTHORIZATION": f"Bearer {raw}"}, "model": LocalModel.objects.get()}


def test_requires_a_key(client: Client, served: dict) -> None:
    response = client.get("/hf/api/models/acme/tiny")
    assert response.status_code == 401
    assert client.get("/hf/api/models/acme/tiny", HTTP_AUTHORIZATION="Bearer apc_forged").status_code == 401


def test_model_info_with_blobs(client: Client, served: dict) -> None:
    body = client.get("/hf/api/models/acme/tiny/revision/main?blobs=true", **served["auth"]).json()
    assert body["sha"] == served["model"].commit
    weights = next(s for s in body["siblings"] if s["rfilename"] == "model.safetensors")
    digest = hashlib.sha256((served["source"] / "model.safetensors").read_bytes()).hexdigest()
    assert weights["lfs"]["sha256"] == digest
    config = next(s for s in body["siblings"] if s["rfilename"] == "config.json")
    assert "lfs" not in config and len(config["blobId"]) == 40


def test_tree_listing(client: Client, served: dict) -> None:
    rows = client.get("/hf/api/models/acme/tiny/tree/main?recursive=true", **served["auth"]).json()
    assert {r["path"] for r in rows} >= {"config.json", "model.safetensors"}


def test_resolve_head_get_and_range(client: Client, served: dict) -> None:
    url = "/hf/acme/tiny/resolve/main/model.safetensors"
    data = (served["source"] / "model.safetensors").read_bytes()
    head = client.head(url, **served["auth"])
    assert head.status_code == 200
    assert head["X-Repo-Commit"] == served["model"].commit
    assert head["X-Linked-Size"] == str(len(data))
    assert head["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    full = client.get(url, **served["auth"])
    assert content(full) == data
    part = client.get(url, HTTP_RANGE="bytes=1000-", **served["auth"])
    assert part.status_code == 206
    assert part["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert content(part) == data[1000:]
    middle = client.get(url, HTTP_RANGE="bytes=10-19", **served["auth"])
    assert content(middle) == data[10:20]
    suffix = client.get(url, HTTP_RANGE="bytes=-5", **served["auth"])
    assert content(suffix) == data[-5:]


@pytest.mark.parametrize("bad", ["bytes=99999999-", "bytes=5-2", "chars=1-2", "bytes=-"])
def test_bad_ranges_are_416(client: Client, served: dict, bad: str) -> None:
    response = client.get("/hf/acme/tiny/resolve/main/config.json", HTTP_RANGE=bad, **served["auth"])
    assert response.status_code == 416


@pytest.mark.parametrize(
    "path",
    [
        "/hf/acme/tiny/resolve/main/../../../../etc/passwd",
        "/hf/acme/tiny/resolve/main/..%2f..%2f..%2fetc%2fpasswd",
        "/hf/acme/tiny/resolve/main/%2Fetc%2Fpasswd",
        "/hf/acme/tiny/resolve/main/not-in-the-model.bin",
        "/hf/acme/../../etc/resolve/main/passwd",
    ],
)
def test_paths_outside_the_model_are_404(client: Client, served: dict, path: str) -> None:
    response = client.get(path, **served["auth"])
    assert response.status_code == 404
    assert b"root:" not in response.content


def test_unknown_repo_and_revision(client: Client, served: dict) -> None:
    unknown = client.get("/hf/api/models/acme/other", **served["auth"])
    assert unknown.status_code == 404 and unknown["X-Error-Code"] == "RepoNotFound"
    revision = client.get("/hf/api/models/acme/tiny/revision/v2", **served["auth"])
    assert revision.status_code == 404 and revision["X-Error-Code"] == "RevisionNotFound"


def test_read_only(client: Client, served: dict) -> None:
    assert client.post("/hf/api/models/acme/tiny", **served["auth"]).status_code == 405
