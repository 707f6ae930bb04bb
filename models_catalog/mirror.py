"""The read-only Hugging Face-compatible endpoint under ``/hf/``, serving this console's ready
models to other appliances and teams (``HF_ENDPOINT=http://console/hf``). Enough of the hub's API
for ``snapshot_download`` and ``hf_hub_download``: model info (with file digests), the file tree,
and file downloads with HEAD metadata and Range requests. Every request needs a key.

Async views with async ORM calls, and files streamed from an async iterator: Django would otherwise
read a whole file into memory before sending it over ASGI.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from appliance.models import ApiToken
from models_catalog.layout import inside
from models_catalog.models import LocalModel, ModelFile

CHUNK = 1024 * 1024
RESOLVE = re.compile(r"^(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
INFO = re.compile(r"^(?P<repo>[^/]+(?:/[^/]+)??)(?:/revision/(?P<revision>[^/]+))?$")
TREE = re.compile(r"^(?P<repo>[^/]+(?:/[^/]+)?)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _error(status: int, message: str, code: str = "") -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    if code:
        response["X-Error-Code"] = code
        response["X-Error-Message"] = message
    return response


async def _authorized(request: HttpRequest) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return False
    return await sync_to_async(ApiToken.authenticate)(header[7:].strip()) is not None


async def _model(repo_id: str, revision: str | None) -> LocalModel | JsonResponse:
    model = await LocalModel.objects.filter(repo_id=repo_id, status__in=list(LocalModel.USABLE)).afirst()
    if model is None:
        return _error(404, "Repository not found", "RepoNotFound")
    if revision is not None and revision not in (model.revision, model.commit):
        return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return model


def _file_entry(file: ModelFile, blobs: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rfilename": file.path}
    if blobs:
        entry.update(size=file.size, blobId=file.blob_id)
        if file.is_lfs:
            entry["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
    return entry


async def _files(model: LocalModel) -> list[ModelFile]:
    return [f async for f in ModelFile.objects.filter(model=model).order_by("path")]


async def model_info(request: HttpRequest, repo: str, revision: str | None) -> HttpResponse:
    found = await _model(repo, revision)
    if isinstance(found, JsonResponse):
        return found
    blobs = request.GET.get("blobs", "").lower() in ("1", "true")
    files = await _files(found)
    return JsonResponse(
        {
            "_id": found.commit,
            "id": found.repo_id,
            "modelId": found.repo_id,
            "sha": found.commit,
            "private": True,
            "gated": False,
            "disabled": False,
            "lastModified": found.updated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
            "tags": [],
            "library_name": "transformers",
            "config": {k: found.config.get(k) for k in ("architectures", "model_type") if k in found.config},
            "siblings": [_file_entry(f, blobs) for f in files],
            "usedStorage": found.size_bytes,
        }
    )


async def tree(request: HttpRequest, repo: str, revision: str, path: str | None) -> HttpResponse:
    found = await _model(repo, revision)
    if isinstance(found, JsonResponse):
        return found
    prefix = (path or "").strip("/")
    recursive = request.GET.get("recursive", "").lower() in ("1", "true")
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for file in await _files(found):
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
    return JsonResponse(folder_entries + entries, safe=False)


async def _stream(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
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


async def resolve(request: HttpRequest, repo: str, revision: str, path: str) -> HttpResponse:
    found = await _model(repo, revision)
    if isinstance(found, JsonResponse):
        return found
    file = await ModelFile.objects.filter(model=found, path=path).afirst()
    if file is None:
        return _error(404, f"{path} does not exist at {found.commit}", "EntryNotFound")
    disk_path = inside(found.ready_path, file.path)
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
    wanted = request.headers.get("Range")
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
            response = _error(416, "Range not satisfiable")
            response["Content-Range"] = f"bytes */{file.size}"
            return response
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
    length = end - start + 1 if file.size else 0
    if request.method == "HEAD":
        response = HttpResponse(status=status, headers=headers)
        response["Content-Length"] = str(length)
        return response
    response = StreamingHttpResponse(_stream(disk_path, start, length), status=status, headers=headers)
    response["Content-Length"] = str(length)
    return response


async def hub(request: HttpRequest, rest: str) -> HttpResponse:
    """The single entry point: routes ``/hf/<rest>`` like the hub does."""
    if request.method not in ("GET", "HEAD"):
        return _error(405, "This endpoint is read-only.")
    if not await _authorized(request):
        return _error(401, "Invalid credentials in Authorization header: send 'Bearer <key>'.")
    if rest.startswith("api/models/"):
        api_path = rest[len("api/models/") :]
        if match := TREE.match(api_path):
            return await tree(request, match["repo"], match["revision"], match["path"])
        if match := INFO.match(api_path):
            return await model_info(request, match["repo"], match["revision"])
        return _error(404, "Not found")
    if match := RESOLVE.match(rest):
        return await resolve(request, match["repo"], match["revision"], match["path"])
    return _error(404, "Not found")
