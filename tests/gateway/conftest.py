from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from django.conf import settings

from gateway.app import GatewayApp
from provisioning.models import Deployment, Replica
from tenancy.models import ApiKey, Department
from tests.gateway.helpers import FakeEngineProcess, ServerThread


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngineProcess]:
    process = FakeEngineProcess().start()
    yield process
    process.kill()


@pytest.fixture(autouse=True)
def own_spool(settings: Any, tmp_path: Any) -> None:
    """Each test's gateways spool (Redis refused a settlement) into a folder of the test's own, so a
    record one test spooled is not adopted and replayed by the next one's gateway."""
    settings.VAR_DIR = tmp_path


@pytest.fixture
def gateway(engine: FakeEngineProcess) -> Iterator[ServerThread]:
    """A fresh gateway (empty caches) on its own port; settings changed before the first request apply."""
    engine.reset()
    app = GatewayApp()
    server = ServerThread(app, app.close).start()
    yield server
    server.stop()


def add_replica(deployment: Deployment, port: int, key: str, ordinal: int = 0) -> Replica:
    replica = Replica(deployment=deployment, ordinal=ordinal, node=settings.NODE_NAME, port=port, state="ready")
    replica.set_key(key)
    replica.save()
    return replica


@dataclass
class Tenant:
    department: Department
    deployment: Deployment
    key: ApiKey
    raw: str
    url: str

    def client(self, raw: str | None = None, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=raw or self.raw, max_retries=0, **options)


@pytest.fixture
def tenant(deployment_factory: Any, engine: FakeEngineProcess, gateway: ServerThread) -> Tenant:
    deployment = deployment_factory(name="tiny")
    add_replica(deployment, engine.port, engine.key)
    department = Department.objects.create(name="Legal", max_tokens_per_request=512)
    department.deployments.add(deployment)
    key, raw = ApiKey.issue(department, "contracts bot")
    return Tenant(department, deployment, key, raw, gateway.url)
