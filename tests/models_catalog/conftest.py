from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models_catalog.models import HubEndpoint
from tests.models_catalog.helpers import Peer, ThrottledProxy, make_model_dir

MiB = 1024 * 1024
WEIGHTS = 24 * MiB


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """A second console with 'acme/tiny' imported and ready, serving it on /hf/."""
    base = tmp_path_factory.mktemp("peer")
    # Bigger than huggingface_hub's 10 MiB write chunk, so a cut transfer leaves bytes to resume from.
    source = make_model_dir(base / "source", weights_bytes=WEIGHTS)
    running = Peer(base).start()
    running.manage("import_model", str(source), "acme/tiny")
    running.source = source
    yield running
    running.stop()


@pytest.fixture
def client_data(settings: Any, tmp_path: Path) -> Path:
    """This console's DATA_DIR for the test: a second data directory, apart from the peer's."""
    settings.DATA_DIR = tmp_path / "client-data"
    settings.DISK_RESERVE_BYTES = 0
    return settings.DATA_DIR


@pytest.fixture
def peer_endpoint(db: None, peer: Peer) -> HubEndpoint:
    endpoint = HubEndpoint(name="peer", url=peer.url + "/hf", kind=HubEndpoint.Kind.PEER)
    endpoint.set_token(peer.token)
    endpoint.save()
    return endpoint


@pytest.fixture
def proxy(peer: Peer) -> Iterator[ThrottledProxy]:
    running = ThrottledProxy(peer.port).start()
    yield running
    running.stop()
