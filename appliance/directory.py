"""Directory sign-in: LDAP / Active Directory through django-auth-ldap, on when ``LDAP_SERVER_URI`` is set.

- The console's service account (``LDAP_BIND_DN``) finds the user under ``LDAP_USER_BASE`` with
  ``LDAP_USER_FILTER``; the user's password is checked by binding as them; StartTLS
  (``LDAP_START_TLS``) with ``LDAP_CA_FILE`` as the trusted CAs.
- Their groups (under ``LDAP_GROUP_BASE``) give their role and department memberships at **every**
  sign-in (``LDAP_ROLE_GROUPS``, ``LDAP_DEPARTMENT_GROUPS``), as ``appliance.group_mapping`` says
  (shared with OpenID Connect sign-in): someone in no mapped group is refused and deactivated.
- Local accounts keep working (ModelBackend comes after this one), and a directory user never takes
  over a local account of the same name. A directory that does not answer is a clear error on the
  sign-in page, while local accounts still sign in.
- Audit events: ``auth.directory_login`` at each directory sign-in (groups, role, ``via: ldap``) and
  ``auth.directory_mapping`` when it changed the user's role or memberships.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ldap
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.dispatch import receiver
from django.http import HttpRequest
from django.utils.translation import gettext as _
from django_auth_ldap.backend import LDAPBackend, ldap_error
from django_auth_ldap.config import (
    GroupOfNamesType,
    GroupOfUniqueNamesType,
    LDAPSearch,
    NestedActiveDirectoryGroupType,
    PosixGroupType,
)

from appliance.group_mapping import apply, map_groups, record_sign_in, refusal_message
from appliance.models import Profile

log = logging.getLogger(__name__)
GROUP_TYPES = {
    "groupOfNames": lambda: GroupOfNamesType(name_attr="cn"),
    "groupOfUniqueNames": lambda: GroupOfUniqueNamesType(name_attr="cn"),
    "posixGroup": lambda: PosixGroupType(name_attr="cn"),
    "activeDirectory": lambda: NestedActiveDirectoryGroupType(name_attr="cn"),
}
GROUP_FILTERS = {
    "groupOfNames": "(objectClass=groupOfNames)",
    "groupOfUniqueNames": "(objectClass=groupOfUniqueNames)",
    "posixGroup": "(objectClass=posixGroup)",
    "activeDirectory": "(objectClass=group)",
}
DIRECTORY_ERROR = "_directory_error"  # set on the request when the directory failed during sign-in


def enabled() -> bool:
    return bool(settings.LDAP_SERVER_URI)


def connection_options() -> dict[int, Any]:
    options: dict[int, Any] = {ldap.OPT_NETWORK_TIMEOUT: settings.LDAP_TIMEOUT_SECONDS,
                               ldap.OPT_TIMEOUT: settings.LDAP_TIMEOUT_SECONDS, ldap.OPT_REFERRALS: 0}  # fmt: skip
    if settings.LDAP_CA_FILE:
        options[ldap.OPT_X_TLS_CACERTFILE] = settings.LDAP_CA_FILE
        options[ldap.OPT_X_TLS_REQUIRE_CERT] = ldap.OPT_X_TLS_DEMAND
        options[ldap.OPT_X_TLS_NEWCTX] = 0  # must come last: makes the TLS context with the above
    return options


def group_base() -> str:
    return settings.LDAP_GROUP_BASE or settings.LDAP_USER_BASE


def backend_settings() -> dict[str, Any]:
    """django-auth-ldap's settings, from the console's ``LDAP_*`` settings."""
    group_type = settings.LDAP_GROUP_TYPE
    return {
        "SERVER_URI": settings.LDAP_SERVER_URI,
        "START_TLS": settings.LDAP_START_TLS,
        "BIND_DN": settings.LDAP_BIND_DN,
        "BIND_PASSWORD": settings.LDAP_BIND_PASSWORD,
        "CONNECTION_OPTIONS": connection_options(),
        "USER_SEARCH": LDAPSearch(settings.LDAP_USER_BASE, ldap.SCOPE_SUBTREE, settings.LDAP_USER_FILTER),
        "USER_ATTR_MAP": {"first_name": "givenName", "last_name": "sn", "email": "mail"},
        "GROUP_SEARCH": LDAPSearch(group_base(), ldap.SCOPE_SUBTREE, GROUP_FILTERS[group_type]),
        "GROUP_TYPE": GROUP_TYPES[group_type](),
        "ALWAYS_UPDATE_USER": True,
    }


class DirectoryBackend(LDAPBackend):
    """django-auth-ldap with the console's settings, role and membership mapping, and guards."""

    @property
    def default_settings(self) -> dict[str, Any]:  # type: ignore[override]
        return backend_settings()

    def authenticate(self, request: HttpRequest | None, username: str | None = None, password: str | None = None,
                     **kwargs: Any) -> Any:  # fmt: skip
        if not enabled() or not username or not password:
            return None
        existing = get_user_model().objects.filter(username__iexact=username.strip()).select_related("profile").first()
        if existing is not None and getattr(getattr(existing, "profile", None), "source", "local") != "ldap":
            return None  # a local account: never taken over by a directory entry of the same name
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            return None
        mapping = map_groups(user.ldap_user.group_dns, settings.LDAP_ROLE_GROUPS, settings.LDAP_DEPARTMENT_GROUPS)
        if not apply(request, user, mapping, Profile.Source.LDAP):
            if request is not None:
                setattr(request, DIRECTORY_ERROR, refusal_message())
            return None
        record_sign_in(request, user, mapping, Profile.Source.LDAP)
        return user

    # The console is served by ASGI: Django looks up a signed-in user's backend asynchronously, and
    # django-auth-ldap's backend (not a BaseBackend) has only the synchronous methods.
    async def aget_user(self, user_id: int) -> Any:
        return await sync_to_async(self.get_user)(user_id)

    async def aauthenticate(self, request: HttpRequest | None, **credentials: Any) -> Any:
        return await sync_to_async(self.authenticate)(request, **credentials)

    def get_or_build_user(self, username: str, ldap_user: Any) -> tuple[Any, bool]:
        user, built = super().get_or_build_user(username, ldap_user)
        if built:
            user.set_unusable_password()  # signs in through the directory only
        return user, built


@receiver(ldap_error)
def _directory_failed(sender: Any, context: str, user: Any, request: HttpRequest | None = None,
                      exception: Exception | None = None, **kwargs: Any) -> None:  # fmt: skip
    if request is not None:  # while signing someone in (looking them up, binding, reading groups)
        setattr(request, DIRECTORY_ERROR, _("The directory server did not answer, so directory accounts cannot sign "
                                            "in now. Local accounts still can."))  # fmt: skip


def describe(exception: Exception) -> str:
    if isinstance(exception, ldap.LDAPError) and exception.args and isinstance(exception.args[0], dict):
        info = exception.args[0]
        return " ".join(str(part) for part in (info.get("desc", ""), info.get("info", "")) if part)
    return str(exception) or type(exception).__name__


def test_connection() -> dict[str, Any]:
    """Bind with the service account and search users and groups: what the Settings page's button shows."""
    started = time.perf_counter()
    result: dict[str, Any] = {"ok": False, "users": 0, "groups": 0, "message": ""}
    if not enabled():
        result["message"] = _("Directory sign-in is off: LDAP_SERVER_URI is not set.")
        return result
    connection = ldap.initialize(settings.LDAP_SERVER_URI)
    try:
        for option, value in connection_options().items():
            connection.set_option(option, value)
        if settings.LDAP_START_TLS:
            connection.start_tls_s()
        connection.simple_bind_s(settings.LDAP_BIND_DN, settings.LDAP_BIND_PASSWORD)
        users = connection.search_s(settings.LDAP_USER_BASE, ldap.SCOPE_SUBTREE,
                                    settings.LDAP_USER_FILTER % {"user": "*"}, ["dn"])  # fmt: skip
        groups = connection.search_s(group_base(), ldap.SCOPE_SUBTREE, GROUP_FILTERS[settings.LDAP_GROUP_TYPE], ["dn"])
        result.update(ok=True, users=len([u for u in users if u[0]]), groups=len([g for g in groups if g[0]]))
        result["message"] = _("Connected and bound as the service account; %(users)d users and %(groups)d groups "
                              "found.") % {"users": result["users"], "groups": result["groups"]}  # fmt: skip
    except ldap.LDAPError as exc:
        result["message"] = _("The directory refused or did not answer: %(error)s") % {"error": describe(exc)}
    finally:
        try:
            connection.unbind_s()
        except ldap.LDAPError:
            pass
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def shown_settings() -> list[tuple[str, str]]:
    """The directory settings for the Settings page: secrets masked."""
    password = settings.LDAP_BIND_PASSWORD
    return [
        ("LDAP_SERVER_URI", settings.LDAP_SERVER_URI),
        ("LDAP_START_TLS", "on" if settings.LDAP_START_TLS else "off"),
        ("LDAP_CA_FILE", settings.LDAP_CA_FILE),
        ("LDAP_BIND_DN", settings.LDAP_BIND_DN),
        ("LDAP_BIND_PASSWORD", "••••••••" if password else ""),
        ("LDAP_USER_BASE", settings.LDAP_USER_BASE),
        ("LDAP_USER_FILTER", settings.LDAP_USER_FILTER),
        ("LDAP_GROUP_BASE", settings.LDAP_GROUP_BASE),
        ("LDAP_GROUP_TYPE", settings.LDAP_GROUP_TYPE),
        ("LDAP_TIMEOUT_SECONDS", str(settings.LDAP_TIMEOUT_SECONDS)),
    ]
