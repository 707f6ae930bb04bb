"""Typed readers for settings taken from the environment.

Each reader raises ``ImproperlyConfigured`` naming the variable when its value is malformed, so a
typo stops start-up with a message instead of a half-configured console.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def _bad(name: str, value: str, expected: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"Setting {name}={value!r} is malformed: expected {expected}.")


def env_str(name: str, default: str) -> str:
    """A string; an empty value counts as unset."""
    value = _raw(name)
    return value if value else default


def env_currency(name: str, default: str) -> str:
    """An ISO 4217 currency code (three capital letters)."""
    value = env_str(name, default)
    if not (len(value) == 3 and value.isascii() and value.isalpha() and value.isupper()):
        raise _bad(name, value, "an ISO 4217 currency code such as USD, EUR or CNY")
    return value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _bad(name, value, "one of 1/0, true/false, yes/no, on/off")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise _bad(name, value, "an integer") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _bad(name, value, f"an integer between {minimum} and {maximum}")
    return number


def env_list(name: str, default: list[str]) -> list[str]:
    """A comma-separated list; blank items are refused rather than silently dropped."""
    value = _raw(name)
    if value is None or value == "":
        return list(default)
    items = [item.strip() for item in value.split(",")]
    if any(not item for item in items):
        raise _bad(name, value, "a comma-separated list without empty items")
    return items


def env_mapping(name: str) -> list[tuple[str, str]]:
    """``KEY => VALUE; KEY => VALUE`` pairs (keys may hold commas and '=', as LDAP DNs do); order kept."""
    value = _raw(name)
    if not value:
        return []
    pairs = []
    for item in value.split(";"):
        if not item.strip():
            continue
        key, arrow, target = item.partition("=>")
        if not arrow or not key.strip() or not target.strip():
            raise _bad(name, value, "entries 'KEY => VALUE' separated by ';'")
        pairs.append((key.strip(), target.strip()))
    return pairs


ROLE_NAMES = ("appliance_admin", "operator", "viewer", "department_admin", "department_viewer")


def env_role_groups(name: str) -> list[tuple[str, str]]:
    """``GROUP => ROLE; ...``: directory groups mapped to one of the console's roles."""
    pairs = env_mapping(name)
    for group, role in pairs:
        if role not in ROLE_NAMES:
            raise ImproperlyConfigured(f"{name} maps {group!r} to {role!r}: expected appliance_admin, operator, "
                                       "viewer, department_admin or department_viewer.")  # fmt: skip
    return pairs


def department_target(target: str) -> tuple[str, str]:
    """``"Department name:admin|viewer"`` as (department name, level): the one reading of a
    department mapping's target, for the check below, the mapping at sign-in and the pages."""
    department, _sep, level = target.rpartition(":")
    return department.strip(), level


def env_department_groups(name: str) -> list[tuple[str, str]]:
    """``GROUP => Department name:admin|viewer; ...``: directory groups mapped to department memberships."""
    pairs = env_mapping(name)
    for group, target in pairs:
        department, level = department_target(target)
        if level not in ("admin", "viewer") or not department:
            raise ImproperlyConfigured(f"{name} maps {group!r} to {target!r}: expected "
                                       "'Department name:admin' or 'Department name:viewer'.")  # fmt: skip
    return pairs


def check_oidc_settings(issuer: str, client_id: str, client_secret: str, scopes: str) -> None:
    """OpenID Connect sign-in needs an issuer URL (https, or http on this machine only: the provider's
    tokens and the client secret must not cross a network in clear), a client id and secret, and the
    ``openid`` scope. Nothing is checked while ``OIDC_ISSUER`` is unset (sign-in off)."""
    if not issuer:
        return
    parts = urlsplit(issuer)
    try:
        parts.port  # noqa: B018 - urllib raises on a non-numeric port only when asked
    except ValueError:
        raise _bad("OIDC_ISSUER", issuer, "a URL with a numeric port") from None
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if not parts.hostname or parts.scheme not in ("https", "http") or (parts.scheme == "http" and not loopback):
        raise _bad("OIDC_ISSUER", issuer, "an https:// URL (http:// only for a provider on this machine)")
    if parts.query or parts.fragment:
        raise _bad("OIDC_ISSUER", issuer, "the issuer URL without a query or fragment")
    for name, value in (("OIDC_CLIENT_ID", client_id), ("OIDC_CLIENT_SECRET", client_secret)):
        if not value:
            raise ImproperlyConfigured(f"Setting {name} is missing: OpenID Connect sign-in (OIDC_ISSUER) needs it.")
    if "openid" not in scopes.split():
        raise _bad("OIDC_SCOPES", scopes, "space-separated scopes including 'openid'")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise _bad(name, value, "one of " + ", ".join(choices))
    return value


def env_url(name: str, default: str, *, schemes: tuple[str, ...]) -> str:
    value = env_str(name, default)
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise _bad(name, value, f"a URL starting with {' or '.join(s + '://' for s in schemes)}")
    if parts.scheme not in ("sqlite",) and not parts.hostname and not parts.path:
        raise _bad(name, value, "a URL with a host")
    try:
        parts.port  # noqa: B018 - urllib raises on a non-numeric port only when asked
    except ValueError:
        raise _bad(name, value, "a URL with a numeric port") from None
    return value


def env_path(name: str, default: Path) -> Path:
    value = _raw(name)
    path = Path(value).expanduser() if value else default
    if value is not None and value and not path.is_absolute():
        raise _bad(name, value, "an absolute path")
    return path


def env_node_name(name: str = "NODE_NAME") -> str:
    """The node's name, used in queue names: letters, digits, dot, dash and underscore only."""
    value = env_str(name, socket.gethostname())
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
    if not value or len(value) > 63 or set(value) - allowed:
        raise _bad(name, value, "1-63 letters, digits, '.', '-' or '_'")
    return value


def secret_key(name: str, key_file: Path) -> str:
    """The secret key from the environment, or generated once into ``key_file`` (mode 0600)."""
    value = _raw(name)
    if value:
        if len(value) < 32:
            raise _bad(name, "<hidden>", "at least 32 characters")
        return value
    if key_file.exists():
        stored = key_file.read_text().strip()
        if len(stored) >= 32:
            return stored
    key_file.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(50)
    # O_EXCL so two processes starting together cannot write two different keys.
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(generated)
    return generated
