"""Give a user a role from the appliance's shell: ``manage.py set_role <user> <role>``.

The break-glass way back in when no appliance admin can sign in (demoted, deactivated, or the last one
forgot their password and nobody is left to reset it): ``manage.py set_role alice appliance_admin``.
It refuses to demote the last active appliance admin, as the users page does, and is audited.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from appliance import audit
from appliance.models import Profile
from appliance.roles import Role


class Command(BaseCommand):
    help = "Give a user one of the roles: " + ", ".join(Role.values) + "."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("role", help="one of: " + ", ".join(Role.values))
        parser.add_argument("--activate", action="store_true", help="also reactivate a deactivated user")

    def handle(self, *args: Any, username: str, role: str, activate: bool, **options: Any) -> None:
        if role not in Role.values:
            raise CommandError(f"Unknown role {role!r}; the roles are: {', '.join(Role.values)}.")
        user = get_user_model().objects.select_related("profile").filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}.")
        if role != Role.APPLIANCE_ADMIN and Profile.is_last_admin(user):
            raise CommandError(f"{username} is the last active appliance admin; make another one first.")
        with transaction.atomic():
            Profile.set_role(user, role)
            detail = {"role": role, "via": "manage.py set_role"}
            if activate and not user.is_active:
                user.is_active = True
                user.save(update_fields=["is_active"])
                detail["activated"] = True
            audit.record(None, "user.set_role", user, detail=detail)
        state = "" if user.is_active else " (the user is deactivated: add --activate to let them sign in)"
        self.stdout.write(f"{username} is now {Role(role).label}{state}.")
