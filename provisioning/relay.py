"""The node relay: how the console reaches a replica on another box without exposing its engine.

vLLM's ``--api-key`` guards only its ``/v1`` routes; ``/metrics``, ``/tokenize``, ``/pause``,
``/invocations`` and others answer anyone who can reach the port. So engines stay bound to
127.0.0.1 on every box, and each box runs one relay (``manage.py relay``) on its cluster address
(``NODE_ADDRESS:RELAY_PORT``). The relay answers only ``/r/<replica id>/<allowed path>``, only with
that replica's own key (compared by hash, in constant time), and passes the request to the engine on
loopback, streaming its answer back as it comes.

The relay knows nothing of the database: the node's reconcile pass writes the table of the replicas
it runs (id → port and the SHA-256 of the key) to ``DATA_DIR/relay/<node>.json`` (mode 0600), and
the relay rereads it when it changes. A route is published when the engine is launched, before it
can be marked ready, so the gateway never sees a ready replica the relay does not know.

The relay also serves this box's ready models on ``/hf/`` (read-only, the hub's API as the console's
own ``/hf/`` speaks it, ``models_catalog.mirror``) to the other boxes' copy jobs, only with the
cluster's sync token; it reads the table of those models the reconcile pass publishes beside the
routes (``models_catalog.copies.publish_table``).

When the engine cannot be reached the relay answers 502 with ``X-Relay-Failure``, which the gateway
takes as a failed replica (it tries another), as it would a refused connection to a local engine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from django.conf import settings

from appliance.private_files import replace_private
from models_catalog.mirror import Served, answer, bearer, is_sync_token, read_span

if TYPE_CHECKING:
    from collections.abc import Iterable

    from provisioning.models import Replica

log = logging.getLogger(__name__)

FAILURE_HEADER = "X-Relay-Failure"
# What the console itself asks of an engine: the gateway's endpoints, the model list, and health and
# metrics for the console's own checks. Everything else vLLM serves is refused, key or not.
ALLOWED = frozenset({
    ("POST", "v1/chat/completions"), ("POST", "v1/completions"), ("POST", "v1/embeddings"),
    ("GET", "v1/models"), ("GET", "health"), ("GET", "metrics"),
})  # fmt: skip
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def table_path(node: str) -> Path:
    return Path(settings.DATA_DIR) / "relay" / f"{node}.json"


def url(node_address: str, replica_pk: int) -> str:
    """The base URL of a replica on another box, as the gateway reaches it."""
    host = f"[{node_address}]" if ":" in node_address else node_address
    return f"http://{host}:{settings.RELAY_PORT}/r/{replica_pk}"


def publish(node: str, replicas: Iterable[Replica]) -> None:
    """Write the node's route table (atomically: the relay may read at any moment)."""
    table = {
        str(replica.pk): {"port": replica.port, "key_sha256": key_digest(replica.key())}
        for replica in replicas
        if replica.port and replica.key_sealed
    }
    replace_private(table_path(node), json.dumps({"replicas": table}))


@dataclass(frozen=True)
class Target:
    port: int
    key_sha256: str


class Reread:
    """A JSON file a node's worker publishes, reread when it changes (one ``stat`` per request);
    an unreadable one keeps the last good contents."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.rows: dict[str, Any] = {}

    def parse(self, data: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def current(self) -> dict[str, Any]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self.rows = None, {}
            return self.rows
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp != self._stamp:
            try:
                self.rows = self.parse(json.loads(self.path.read_text()))
                self._stamp = stamp
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("relay: unreadable table %s (%s); keeping the last one", self.path, exc)
        return self.rows


class Table(Reread):
    """The published routes: replica id → engine port and key digest."""

    def parse(self, data: dict[str, Any]) -> dict[str, Any]:
        return {pk: Target(int(row["port"]), str(row["key_sha256"])) for pk, row in data["replicas"].items()}

    def get(self, replica: str) -> Target | None:
        return self.current().get(replica)


class ModelTable(Reread):
    """The models this box holds (``models_catalog.copies.publish_table``), served on ``/hf/``."""

    def parse(self, data: dict[str, Any]) -> dict[str, Any]:
        return {repo: Served.from_row(repo, row) for repo, row in data["models"].items()}

    async def lookup(self, repo_id: str) -> Served | None:
        return self.current().get(repo_id)


def _refusal(status: int, message: str, code: str, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class Relay:
    def __init__(self, table: Table, engine_host: str = "127.0.0.1", models: ModelTable | None = None) -> None:
        self.table, self.engine_host, self.models = table, engine_host, models
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=settings.GATEWAY_MAX_BODY_BYTES)
        app.router.add_route("*", "/r/{replica:[0-9]{1,12}}/{path:.*}", self.forward)
        if self.models is not None:
            app.router.add_route("*", "/hf/{rest:.*}", self.hub)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if (request.method, path) not in ALLOWED:
            return _refusal(404, "Not served through the relay.", "not_found")
        target = self.table.get(request.match_info["replica"])
        bearer = request.headers.get("Authorization", "")
        offered = bearer[7:] if bearer.startswith("Bearer ") else ""
        # Unknown replica and wrong key answer alike: the relay does not say which replicas exist.
        if target is None or not offered or not hmac.compare_digest(key_digest(offered), target.key_sha256):
            return _refusal(401, "Unauthorized.", "invalid_api_key")
        assert self.session is not None
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        body = await request.read()
        upstream_url = f"http://{self.engine_host}:{target.port}/{path}"
        try:
            upstream = await self.session.request(request.method, upstream_url, data=body or None, headers=headers)
        except (aiohttp.ClientConnectionError, TimeoutError):
            return _refusal(502, "The engine is not answering.", "upstream_failed", **{FAILURE_HEADER: "unreachable"})
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Cache-Control"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                # The engine died mid-answer: cut the connection so the caller sees a broken answer,
                # never a short one that looks whole.
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response

    async def hub(self, request: web.Request) -> web.StreamResponse:
        """This box's models for the other boxes (a copy job), only with the cluster's sync token."""
        assert self.models is not None
        authorized = is_sync_token(bearer(request.headers))
        result = await answer(request.method, request.match_info["rest"], request.headers, request.query,
                              self.models.lookup, authorized)  # fmt: skip
        if result.span is None:
            if result.body is None:
                return web.Response(status=result.status, headers=result.headers)
            return web.json_response(result.body, status=result.status, headers=result.headers)
        response = web.StreamResponse(status=result.status, headers=result.headers)
        await response.prepare(request)
        async for chunk in read_span(*result.span):
            await response.write(chunk)
        await response.write_eof()
        return response


def serve(host: str, port: int, node: str, **options: Any) -> None:
    from models_catalog.copies import table_path as models_table

    relay = Relay(Table(table_path(node)), models=ModelTable(models_table(node)))
    web.run_app(relay.app(), host=host, port=port, access_log=None, print=None, **options)
