"""Directory groups → the console's role and department memberships, shared by every directory sign-in
(LDAP in ``appliance/directory.py``, OpenID Connect in ``appliance/oidc.py``).

Applied at **every** sign-in: the highest mapped role wins; with only department groups, a department
role (admin if any mapping says admin). Someone removed from a group loses what it gave; someone in
no mapped group is refused and their account deactivated. Audit events: ``auth.directory_login`` at
each directory sign-in (groups, role, ``via``) and ``auth.directory_mapping`` when it changed the
user's role or memberships (or refused them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest
from django.utils.translation import gettext as _

from appliance.audit import record
from appliance.env import department_target
from appliance.roles import Role

# Best first: a user in several mapped groups gets the highest of their roles.
ROLE_ORDER = (Role.APPLIANCE_ADMIN, Role.OPERATOR, Role.VIEWER, Role.DEPARTMENT_ADMIN, Role.DEPARTMENT_VIEWER)

_membership_sync: Callable[[Any, Mapping[str, str]], dict[str, list[str]]] | None = None


def register_membership_sync(sync: Callable[[Any, Mapping[str, str]], dict[str, list[str]]]) -> None:
    """Called by the tenancy app: ``sync(user, {department name: "admin"|"viewer"})`` makes the user's
    memberships exactly those and says what changed (``added``, ``removed``, ``changed``, ``unknown``)."""
    global _membership_sync
    _membership_sync = sync


def refusal_message() -> str:
    """What someone in no mapped group is told on the sign-in page."""
    return _("Your directory account is in no group that this console maps to a role. Ask an administrator.")


@dataclass(frozen=True)
class GroupMapping:
    role: Role | None
    departments: dict[str, str]  # department name -> "admin" | "viewer"
    groups: list[str]  # the user's groups that a mapping named


def map_groups(groups: Iterable[str], role_groups: list[tuple[str, str]],
               department_groups: list[tuple[str, str]]) -> GroupMapping:  # fmt: skip
    """The role and memberships that these groups give (role None: no mapped group). Group names
    (LDAP DNs, OpenID Connect group claims) compare without regard to case."""
    held = {group.lower() for group in groups}
    matched: list[str] = []
    roles: set[Role] = set()
    for group, role in role_groups:
        if group.lower() in held:
            roles.add(Role(role))
            matched.append(group)
    departments: dict[str, str] = {}
    for group, target in department_groups:
        if group.lower() in held:
            name, level = department_target(target)
            if departments.get(name) != "admin":
                departments[name] = level
            matched.append(group)
    role = next((r for r in ROLE_ORDER if r in roles), None)
    if role is None and departments:
        role = Role.DEPARTMENT_ADMIN if "admin" in departments.values() else Role.DEPARTMENT_VIEWER
    return GroupMapping(role, departments, matched)


def apply(request: HttpRequest | None, user: Any, mapping: GroupMapping, source: str) -> bool:
    """Give a directory user what their groups map to (False: nothing, and the account is deactivated).
    ``source`` is the ``Profile.Source`` the account comes from."""
    from appliance.models import Profile

    profile, _created = Profile.objects.get_or_create(user=user, defaults={"source": source})
    before = profile.role
    if mapping.role is None:
        if user.is_active:
            user.is_active = False
            user.save(update_fields=["is_active"])
        record(request, "auth.directory_mapping", user, actor=user, outcome="denied",
               detail={"role_before": before, "role": "", "reason": "in no mapped group", "via": source})  # fmt: skip
        return False
    profile.role, profile.source = mapping.role, source
    profile.save(update_fields=["role", "source"])
    if not user.is_active:
        user.is_active = True
        user.save(update_fields=["is_active"])
    changes = _membership_sync(user, mapping.departments) if _membership_sync else {}
    if before != mapping.role or any(changes.values()):
        record(request, "auth.directory_mapping", user, actor=user,
               detail={"role_before": before, "role": mapping.role.value, **changes, "via": source})  # fmt: skip
    return True


def record_sign_in(request: HttpRequest | None, user: Any, mapping: GroupMapping, source: str) -> None:
    """The ``auth.directory_login`` event of a directory sign-in that the mapping let through."""
    role = mapping.role.value if mapping.role else ""
    record(request, "auth.directory_login", user, actor=user,
           detail={"groups": mapping.groups, "role": role, "via": source})  # fmt: skip
