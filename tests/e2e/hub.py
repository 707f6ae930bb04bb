"""A local, hub-compatible endpoint serving one model directory read-only, at a limited rate so a
download takes a few seconds and its progress can be watched. It answers what the console's
``HubSource`` asks (the same subset of the hub's API as the console's own /hf/ mirror): model info
with file digests, and file downloads with Range requests."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from models_catalog.hashing import file_digests, lfs_pointer_blob_id

INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<revision>[^/?]+))?(?:\?.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>[^?]+)(?:\?.*)?$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 64 * 1024


class LocalHub:
    """Serves ``directory`` as the repository ``repo_id`` (branch ``main``) on 127.0.0.1.

    ``rate_bps`` limits each file transfer; safetensors files are LFS files (checked by sha256),
    the others plain git blobs (checked by blob id), as on the real hub."""

    def __init__(self, directory: Path, repo_id: str, rate_bps: int = 512 * 1024) -> None:
        self.directory, self.repo_id, self.rate_bps = directory, repo_id, rate_bps
        self.files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            name = path.relative_to(directory).as_posix()
            sha256, blob_id = file_digests(path)
            size = path.stat().st_size
            lfs = name.endswith(".safetensors")
            self.files[name] = {"size": size, "sha256": sha256 if lfs else None,
                                "blob_id": lfs_pointer_blob_id(sha256, size) if lfs else blob_id}  # fmt: skip
        self.commit = hashlib.sha1(json.dumps(self.files, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                if match := RESOLVE.match(self.path):
                    hub.resolve(self, match["repo"], match["revision"], match["path"])
                elif match := INFO.match(self.path):
                    hub.info(self, match["repo"], match["revision"])
                else:
                    hub.error(self, 404, "Not found", "EntryNotFound")

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LocalHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _known(self, handler: BaseHTTPRequestHandler, repo: str, revision: str | None) -> bool:
        if repo != self.repo_id:
            self.error(handler, 404, "Repository not found", "RepoNotFound")
            return False
        if revision not in (None, "main", self.commit):
            self.error(handler, 404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return False
        return True

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def error(self, handler: BaseHTTPRequestHandler, status: int, message: str, code: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(handler, status, body, headers)

    def info(self, handler: BaseHTTPRequestHandler, repo: str, revision: str | None) -> None:
        if not self._known(handler, repo, revision):
            return
        siblings = []
        for name, file in self.files.items():
            entry: dict[str, Any] = {"rfilename": name, "size": file["size"], "blobId": file["blob_id"]}
            if file["sha256"]:
                entry["lfs"] = {"sha256": file["sha256"], "size": file["size"], "pointerSize": 134}
            siblings.append(entry)
        config = json.loads((self.directory / "config.json").read_text())
        body = {
            "_id": self.commit, "id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "private": False,
            "gated": False, "disabled": False, "lastModified": "2026-11-01T00:00:00.000Z", "tags": [],
            "library_name": "transformers", "siblings": siblings,
            "config": {k: config[k] for k in ("architectures", "model_type") if k in config},
        }  # fmt: skip
        self._send(handler, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def resolve(self, handler: BaseHTTPRequestHandler, repo: str, revision: str, path: str) -> None:
        if not self._known(handler, repo, revision):
            return
        file = self.files.get(path)
        if file is None:
            self.error(handler, 404, f"{path} does not exist at {self.commit}", "EntryNotFound")
            return
        size, start, status = file["size"], 0, 200
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{file["sha256"] or file["blob_id"]}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}  # fmt: skip
        if file["sha256"]:
            headers["X-Linked-Etag"] = f'"{file["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        if wanted := handler.headers.get("Range"):
            match = RANGE.match(wanted.strip())
            if not match or int(match[1]) >= size:
                self.error(handler, 416, "Range not satisfiable", "RangeNotSatisfiable")
                return
            start, status = int(match[1]), 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(size - start))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        with (self.directory / path).open("rb") as source:
            source.seek(start)
            while chunk := source.read(CHUNK):
                handler.wfile.write(chunk)
                time.sleep(len(chunk) / self.rate_bps)
