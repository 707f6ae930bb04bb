"""The read-only Hugging Face-compatible endpoint under ``/hf/``, serving the ready models this box
holds to other appliances, teams (``HF_ENDPOINT=http://console/hf``) and other boxes of this
console. Enough of the hub's API for ``snapshot_download`` and ``hf_hub_download``: model info (with
file digests), the file tree, and file downloads with HEAD metadata and Range requests. Every
request needs a key: an API token, or (box to box) the cluster's sync token.

The hub's rules are written once (``answer``) over ``Served`` (a model as this box holds it) and used
by two front doors: the console's Django views below, which read the database, and each box's
relay (``provisioning.relay``), which reads the table its node publishes (``models_catalog.copies``)
and knows nothing of the database. A model is served only by a box that holds its files.

Async views with async ORM calls, and files streamed from an async iterator: Django would otherwise
read a whole file into memory before sending it over ASGI.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from appliance.models import ApiToken
from models_catalog.layout import inside
from models_catalog.models import LocalModel, ModelFile

CHUNK = 1024 * 1024
RESOLVE = re.compile(r"^(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
INFO = re.compile(r"^(?P<repo>[^/]+(?:/[^/]+)??)(?:/revision/(?P<revision>[^/]+))?$")
TREE = re.compile(r"^(?P<repo>[^/]+(?:/[^/]+)?)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
SYNC_TOKEN_PREFIX = "sync_"  # noqa: S105 - a public prefix, not a secret


def sync_token() -> str:
    """The credential boxes of this console use with each other's ``/hf/``: derived from the
    ``SECRET_KEY`` they share, so it needs no storage and changes with the key."""
    digest = hmac.new(settings.SECRET_KEY.encode(), b"appliance model sync", hashlib.sha256).hexdigest()
    return SYNC_TOKEN_PREFIX + digest


def is_sync_token(offered: str) -> bool:
    return offered.startswith(SYNC_TOKEN_PREFIX) and hmac.compare_digest(offered, sync_token())


def bearer(headers: Mapping[str, str]) -> str:
    header = headers.get("Authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else ""


@dataclass(frozen=True)
class ServedFile:
    path: str
    size: int
    sha256: str
    blob_id: str
    is_lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.blob_id

    def row(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "blob_id": self.blob_id,
                "is_lfs": self.is_lfs}  # fmt: skip


@dataclass(frozen=True)
class Served:
    """A ready model as this box holds it: what the hub's answers are made of."""

    repo_id: str
    revision: str
    commit: str
    updated_at: str  # ISO 8601, UTC
    config: dict[str, Any]
    size: int
    root: Path  # the ready copy on this box's disk
    files: list[ServedFile] = field(default_factory=list)

    @classmethod
    def of(cls, model: LocalModel, files: list[ModelFile]) -> Served:
        config = {k: model.config.get(k) for k in ("architectures", "model_type") if k in model.config}
        return cls(
            repo_id=model.repo_id, revision=model.revision, commit=model.commit,
            updated_at=model.updated_at.astimezone(UTC).isoformat(), config=config, size=model.size_bytes,
            root=model.ready_path,
            files=[ServedFile(f.path, f.size, f.sha256, f.blob_id, f.is_lfs) for f in files],
        )  # fmt: skip

    def row(self) -> dict[str, Any]:
        """As a node's published table keeps it (``models_catalog.copies.publish_table``)."""
        return {"revision": self.revision, "commit": self.commit, "updated_at": self.updated_at,
                "config": self.config, "size": self.size, "root": str(self.root),
                "files": [f.row() for f in self.files]}  # fmt: skip

    @classmethod
    def from_row(cls, repo_id: str, row: dict[str, Any]) -> Served:
        return cls(
            repo_id=repo_id, revision=str(row["revision"]), commit=str(row["commit"]),
            updated_at=str(row["updated_at"]), config=dict(row.get("config") or {}), size=int(row["size"]),
            root=Path(row["root"]), files=[ServedFile(**f) for f in row["files"]],
        )  # fmt: skip


@dataclass
class Answer:
    """What to send: JSON (``body``) or a span of a file (``span``: path, start, length), or neither."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    span: tuple[Path, int, int] | None = None


Lookup = Callable[[str], Awaitable[Served | None]]


def _error(status: int, message: str, code: str = "") -> Answer:
    headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {}
    return Answer(status, headers, {"error": message})


def _served(found: Served | None, revision: str | None) -> Served | Answer:
    if found is None:
        return _error(404, "Repository not found", "RepoNotFound")
    if revision is not None and revision not in (found.revision, found.commit):
        return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return found


def _file_entry(file: ServedFile, blobs: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rfilename": file.path}
    if blobs:
        entry.update(size=file.size, blobId=file.blob_id)
        if file.is_lfs:
            entry["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
    return entry


def model_info(found: Served, blobs: bool) -> Answer:
    updated = datetime.fromisoformat(found.updated_at).astimezone(UTC)
    return Answer(200, body={
        "_id": found.commit, "id": found.repo_id, "modelId": found.repo_id, "sha": found.commit,
        "private": True, "gated": False, "disabled": False,
        "lastModified": updated.strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
        "tags": [], "library_name": "transformers", "config": found.config,
        "siblings": [_file_entry(f, blobs) for f in found.files], "usedStorage": found.size,
    })  # fmt: skip


def tree(found: Served, path: str | None, recursive: bool) -> Answer:
    prefix = (path or "").strip("/")
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for file in found.files:
        if prefix and not file.path.startswith(prefix + "/"):
            continue
        rest = file.path[len(prefix) + 1 :] if prefix else file.path
        if not recursive and "/" in rest:
            folders.add((prefix + "/" if prefix else "") + rest.split("/", 1)[0])
            continue
        if recursive:
            parts = file.path.split("/")[:-1]
            for depth in range(len(prefix.split("/")) if prefix else 0, len(parts)):
                folders.add("/".join(parts[: depth + 1]))
        entry: dict[str, Any] = {"type": "file", "oid": file.blob_id, "size": file.size, "path": file.path}
        if file.is_lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
        entries.append(entry)
    if prefix and not entries and not folders:
        return _error(404, f"{prefix} does not exist", "EntryNotFound")
    folder_entries = [{"type": "directory", "oid": "", "size": 0, "path": f} for f in sorted(folders)]
    return Answer(200, body=folder_entries + entries)


def resolve(found: Served, path: str, method: str, wanted: str | None) -> Answer:
    file = next((f for f in found.files if f.path == path), None)
    if file is None:
        return _error(404, f"{path} does not exist at {found.commit}", "EntryNotFound")
    headers = {
        "X-Repo-Commit": found.commit,
        "ETag": f'"{file.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{Path(file.path).name}"',
    }
    if file.is_lfs:
        headers["X-Linked-Etag"] = f'"{file.sha256}"'
        headers["X-Linked-Size"] = str(file.size)
    start, end = 0, file.size - 1
    status = 200
    if wanted:
        match = RANGE.match(wanted.strip())
        if not match or (not match.group(1) and not match.group(2)):
            return _error(416, f"Unsupported range {wanted!r}")
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), file.size - 1) if match.group(2) else file.size - 1
        else:  # a suffix: the last N bytes
            start = max(file.size - int(match.group(2)), 0)
        if start >= file.size or start > end:
            refused = _error(416, "Range not satisfiable")
            refused.headers["Content-Range"] = f"bytes */{file.size}"
            return refused
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
    length = end - start + 1 if file.size else 0
    headers["Content-Length"] = str(length)
    if method == "HEAD":
        return Answer(status, headers)
    return Answer(status, headers, span=(inside(found.root, file.path), start, length))


async def answer(
    method: str, rest: str, headers: Mapping[str, str], query: Mapping[str, str], lookup: Lookup, authorized: bool
) -> Answer:
    """Route ``/hf/<rest>`` like the hub does."""
    if method not in ("GET", "HEAD"):
        return _error(405, "This endpoint is read-only.")
    if not authorized:
        return _error(401, "Invalid credentials in Authorization header: send 'Bearer <key>'.")
    if rest.startswith("api/models/"):
        api_path = rest[len("api/models/") :]
        if match := TREE.match(api_path):
            found = _served(await lookup(match["repo"]), match["revision"])
            recursive = query.get("recursive", "").lower() in ("1", "true")
            return found if isinstance(found, Answer) else tree(found, match["path"], recursive)
        if match := INFO.match(api_path):
            found = _served(await lookup(match["repo"]), match["revision"])
            blobs = query.get("blobs", "").lower() in ("1", "true")
            return found if isinstance(found, Answer) else model_info(found, blobs)
        return _error(404, "Not found")
    if match := RESOLVE.match(rest):
        found = _served(await lookup(match["repo"]), match["revision"])
        if isinstance(found, Answer):
            return found
        return resolve(found, match["path"], method, headers.get("Range"))
    return _error(404, "Not found")


async def read_span(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(handle.seek, start)
        left = length
        while left > 0:
            chunk = await asyncio.to_thread(handle.read, min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        handle.close()


# The console's front door (Django).


async def _lookup(repo_id: str) -> Served | None:
    model = await LocalModel.objects.filter(repo_id=repo_id, status__in=list(LocalModel.USABLE)).afirst()
    if model is None or not await sync_to_async(model.held_on)(settings.NODE_NAME):
        return None
    return Served.of(model, [f async for f in ModelFile.objects.filter(model=model).order_by("path")])


async def _authorized(request: HttpRequest) -> bool:
    offered = bearer(request.headers)
    if not offered:
        return False
    return is_sync_token(offered) or await sync_to_async(ApiToken.authenticate)(offered) is not None


async def hub(request: HttpRequest, rest: str) -> HttpResponse:
    """The single entry point: ``/hf/<rest>``."""
    authorized = request.method in ("GET", "HEAD") and await _authorized(request)
    result = await answer(request.method or "", rest, request.headers, request.GET, _lookup, authorized)
    if result.span is not None:
        response: HttpResponse = StreamingHttpResponse(read_span(*result.span), status=result.status)
    elif result.body is not None:
        response = JsonResponse(result.body, status=result.status, safe=False)
    else:
        response = HttpResponse(status=result.status)
    for name, value in result.headers.items():
        response[name] = value
    return response
