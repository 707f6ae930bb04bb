"""The API tokens page tells how to send a token, with the placeholder shown (not eaten as a tag)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_the_header_to_send_is_shown_whole(admin_client: Client) -> None:
    page = admin_client.get(reverse("tokens")).content.decode()
    assert "<code>Authorization: Bearer &lt;token&gt;</code>" in page
