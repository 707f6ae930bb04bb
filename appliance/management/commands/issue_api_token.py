"""Issue a management API token for a user (automation, peer appliances pulling from /hf/)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from appliance import audit
from appliance.models import ApiToken


class Command(BaseCommand):
    help = "Issue an API token for a user and print it once."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="command line")

    def handle(self, *args: Any, username: str, name: str, **options: Any) -> None:
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"No active user named {username!r}.")
        token, raw = ApiToken.issue(user, name)
        audit.record(None, "api_token.create", token, actor=user, detail={"via": "manage.py"})
        self.stdout.write(raw)
