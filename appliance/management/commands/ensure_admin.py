"""Create the first appliance admin when there is none, and print its password once."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from appliance import audit
from appliance.models import Profile
from appliance.roles import Role


class Command(BaseCommand):
    help = "Create the first appliance admin if none exists; prints its password once."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        users = get_user_model().objects
        has_admin = (
            users.filter(is_active=True, is_superuser=True).exists()
            or Profile.objects.filter(role=Role.APPLIANCE_ADMIN, user__is_active=True).exists()
        )
        if has_admin:
            self.stdout.write("An appliance admin exists already.")
            return
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            if users.filter(username=username).exists():
                raise SystemExit(f"A user named {username!r} exists but is not an active admin; pass --username.")
            user = users.create_superuser(username=username, email="", password=password)
            # The password is printed, so it is known to whoever saw the terminal: the console asks
            # for a new one at the first login, before anything else.
            Profile.objects.create(user=user, role=Role.APPLIANCE_ADMIN, must_change_password=True)
            audit.record(None, "user.create_first_admin", user)
        self.stdout.write(
            self.style.SUCCESS(
                f"Created the first appliance admin. User: {username}  Password: {password}\n"
                "This password is shown only once: the console asks for a new one at the first login."
            )
        )
