"""The edge to the hub: ``ModelSource`` and its implementation over ``huggingface_hub``.

Errors are sorted into ``PermanentSourceError`` (404, 401/403, an endpoint that is not a hub) and
``TransientSourceError`` (5xx, timeouts, dropped connections), which callers retry with a cap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpcore2
import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils import tqdm as hf_tqdm

from models_catalog.layout import check_commit, check_file_path

# Measured with bench/download.py on a LAN-speed transfer, where the Python client, not the link,
# is the limit: huggingface_hub re-assembles its 10 MiB chunks from 64 KiB socket reads (546 vs
# 1134 MiB/s through httpx2 with 10 vs 1 MiB chunks), and each 64 KiB read goes through h11's event
# machinery. 1 MiB for both took the job from about 250 to about 500 MiB/s. Smaller chunks also
# make progress finer and leave less to fetch again after a dropped connection.
hf_constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024
httpcore2.HTTP11Connection.READ_NUM_BYTES = 1024 * 1024


class SourceError(Exception):
    """A problem with the source; the message is meant for the admin."""


class PermanentSourceError(SourceError):
    """Retrying will not help (unknown repo, refused access, not a hub)."""


class TransientSourceError(SourceError):
    """May work later (server error, timeout, dropped connection)."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class RemoteSnapshot:
    commit: str
    files: list[RemoteFile]


ProgressCallback = Callable[[int], None]


class ModelSource(Protocol):
    def snapshot(self, repo_id: str, revision: str) -> RemoteSnapshot: ...

    def fetch(
        self, repo_id: str, commit: str, file: RemoteFile, writer: Any, resume_size: int, progress: ProgressCallback
    ) -> None: ...


def _progress_class(callback: ProgressCallback) -> type[hf_tqdm]:
    """A tqdm that reports each chunk to ``callback`` (which may raise to stop the transfer)."""

    class Reporting(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            callback(int(n or 0))
            return None

    return Reporting


def _explain(exc: Exception, what: str) -> SourceError:
    if isinstance(exc, GatedRepoError):
        return PermanentSourceError(f"{what}: access refused (gated repository); set a token on the endpoint.")
    if isinstance(exc, RevisionNotFoundError):
        return PermanentSourceError(f"{what}: the branch or commit does not exist.")
    if isinstance(exc, RepositoryNotFoundError):
        status = exc.response.status_code if exc.response is not None else 404
        if status == 401:
            return PermanentSourceError(f"{what}: the endpoint refused access (401); it needs a valid token.")
        return PermanentSourceError(f"{what}: no such repository on this endpoint (404).")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            return PermanentSourceError(f"{what}: the endpoint refused access ({status}); check the token.")
        if status == 404:
            return PermanentSourceError(f"{what}: not found on this endpoint (404).")
        if status >= 500 or status in (408, 429):
            return TransientSourceError(f"{what}: the endpoint answered {status}; will retry.")
        return PermanentSourceError(f"{what}: the endpoint answered {status}.")
    if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError):
        return TransientSourceError(f"{what}: connection problem ({type(exc).__name__}: {exc}).")
    if isinstance(exc, ValueError):  # JSON that is not JSON: a web page, a proxy's error page
        return PermanentSourceError(f"{what}: the endpoint did not answer like a Hugging Face hub ({exc}).")
    return SourceError(f"{what}: {type(exc).__name__}: {exc}")


def with_retries(call: Callable[[], Any], attempts: int = 4, first_delay: float = 1.0) -> Any:
    """Run ``call``, retrying transient errors with capped exponential backoff; never forever."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return call()
        except TransientSourceError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


class HubSource:
    """A Hugging Face-compatible endpoint (the hub, a mirror, another console's /hf/)."""

    def __init__(self, endpoint: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.timeout = timeout
        # token=False rather than None: never pick up a token from this machine's HF login.
        self.api = HfApi(endpoint=self.endpoint, token=token or False)

    def snapshot(self, repo_id: str, revision: str) -> RemoteSnapshot:
        what = f"{repo_id}@{revision} on {self.endpoint}"

        def call() -> RemoteSnapshot:
            try:
                info = self.api.model_info(repo_id, revision=revision, files_metadata=True, timeout=self.timeout)
            except Exception as exc:
                raise _explain(exc, what) from exc
            if not info.sha or info.siblings is None:
                raise PermanentSourceError(f"{what}: the endpoint's answer has no commit or file list.")
            files = []
            for sibling in info.siblings:
                check_file_path(sibling.rfilename)
                if sibling.size is None or sibling.blob_id is None:
                    raise PermanentSourceError(f"{what}: the endpoint gave no size or digest for {sibling.rfilename}.")
                sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
                files.append(RemoteFile(sibling.rfilename, int(sibling.size), sibling.blob_id, sha256))
            return RemoteSnapshot(check_commit(info.sha), files)

        return with_retries(call)

    def fetch(
        self, repo_id: str, commit: str, file: RemoteFile, writer: Any, resume_size: int, progress: ProgressCallback
    ) -> None:
        """Stream one file into ``writer`` from ``resume_size`` on (huggingface_hub's own retries
        resume dropped connections mid-file)."""
        url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token or False, library_name="appliance-console")
        try:
            http_get(
                url,
                writer,
                resume_size=resume_size,
                headers=headers,
                expected_size=file.size,
                displayed_filename=file.path,
                tqdm_class=_progress_class(progress),
            )
        except (HfHubHTTPError, httpx2.HTTPError) as exc:
            raise _explain(exc, f"{repo_id}/{file.path}") from exc
        except OSError as exc:
            if "Consistency check failed" in str(exc):
                raise TransientSourceError(f"{repo_id}/{file.path}: the transfer ended early ({exc}).") from exc
            raise
