"""Directory sign-in by OpenID Connect (authorization code flow with PKCE, through Authlib), on when
``OIDC_ISSUER`` is set.

- "Sign in with <OIDC_BUTTON_LABEL>" on the sign-in page starts the flow (``start``): the provider's
  discovery document gives its endpoints; the state, nonce and PKCE verifier (S256) stay in the
  session, used once.
- The provider sends the browser back to ``/login/oidc/callback`` (``finish``): the code is exchanged
  with the client secret and the verifier; the ID token's signature (the provider's JWKS), issuer,
  audience, nonce and expiry are checked. The user name is ``OIDC_USERNAME_CLAIM``; the groups are
  ``OIDC_GROUPS_CLAIM`` of the ID token or, when it is not there, of userinfo.
- The groups give the role and department memberships at **every** sign-in (``OIDC_ROLE_GROUPS``,
  ``OIDC_DEPARTMENT_GROUPS``; ``appliance.group_mapping``, shared with LDAP). Someone in no mapped
  group is refused and their account deactivated.
- An OpenID Connect account is bound to the provider's subject (issuer and ``sub``); it never takes
  over a local or LDAP account of the same name. Local accounts keep working whatever the provider
  does.
- Every failure (provider down, state missing or used twice, refused client credentials, an ID token
  that does not verify) is a clear message on the sign-in page and an ``auth.directory_login`` event
  with outcome ``failed``; nobody is signed in.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from authlib.integrations.base_client import MismatchingStateError
from authlib.integrations.django_client import DjangoOAuth2App, OAuth, OAuthError
from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest
from django.urls import reverse
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from joserfc.errors import JoseError

from appliance.audit import record
from appliance.group_mapping import apply, map_groups, record_sign_in, refusal_message
from appliance.models import Profile

SOURCE = Profile.Source.OIDC
NEXT = "_oidc_next"  # where to go after signing in, kept in the session during the flow
# The session that an OpenID Connect sign-in opens: Django's own backend loads the user of each
# later request (the account has no usable password, so nobody signs in to it with one).
SESSION_BACKEND = "django.contrib.auth.backends.ModelBackend"


class SignInError(Exception):
    """A sign-in that failed: ``message`` is for the person signing in, ``reason`` for the audit log."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(reason)
        self.message, self.reason = message, reason


def enabled() -> bool:
    return bool(settings.OIDC_ISSUER)


def discovery_url() -> str:
    return settings.OIDC_ISSUER + "/.well-known/openid-configuration"


def client() -> DjangoOAuth2App:
    """Authlib's client for the configured provider (made per use: the settings may change in tests,
    and its discovery document is a small request)."""
    registry = OAuth()
    return registry.register(
        "oidc",
        client_id=settings.OIDC_CLIENT_ID,
        client_secret=settings.OIDC_CLIENT_SECRET,
        server_metadata_url=discovery_url(),
        client_kwargs={
            "scope": settings.OIDC_SCOPES,
            "code_challenge_method": "S256",
            "default_timeout": settings.OIDC_TIMEOUT_SECONDS,
        },
    )


def _provider_down(exc: Exception) -> SignInError:
    return SignInError(
        _("The identity provider did not answer, so it cannot sign anyone in now. Local accounts still can."),
        f"provider unreachable: {type(exc).__name__}",
    )


def _metadata(app: DjangoOAuth2App) -> dict[str, Any]:
    """The provider's discovery document, checked to be the configured issuer's."""
    try:
        metadata = app.load_server_metadata()
    except (requests.RequestException, ValueError) as exc:
        raise _provider_down(exc) from exc
    if metadata.get("issuer", "").rstrip("/") != settings.OIDC_ISSUER:
        raise SignInError(
            _("The identity provider's discovery document names another issuer: check OIDC_ISSUER."),
            f"issuer mismatch: {metadata.get('issuer')!r}",
        )
    return metadata


def callback_url(request: HttpRequest) -> str:
    """The redirect URI to register at the provider."""
    return request.build_absolute_uri(reverse("oidc-callback"))


def start(request: HttpRequest, next_url: str) -> str:
    """Where to send the browser to sign in at the provider (state, nonce and PKCE verifier kept in
    the session)."""
    app = client()
    _metadata(app)
    try:
        found = app.create_authorization_url(callback_url(request))
    except requests.RequestException as exc:
        raise _provider_down(exc) from exc
    app.save_authorize_data(request, redirect_uri=callback_url(request), **found)
    request.session[NEXT] = next_url
    return found["url"]


def _exchange(request: HttpRequest) -> dict[str, Any]:
    """The callback's code for tokens, the ID token verified (signature, issuer, audience, nonce, expiry)."""
    app = client()
    metadata = _metadata(app)
    if "state" not in request.GET:
        raise SignInError(_("The identity provider's answer has no state. Start again."), "no state")
    try:
        # Authlib checks the audience only when told to: the ID token must be for this client (an
        # "azp" naming it is not enough), from this issuer.
        expected = {"iss": {"essential": True, "value": metadata["issuer"]},
                    "aud": {"essential": True, "value": settings.OIDC_CLIENT_ID}}  # fmt: skip
        token = app.authorize_access_token(request, claims_options=expected)
    except MismatchingStateError as exc:
        raise SignInError(
            _("This sign-in answer was already used or does not belong to this browser. Start again."),
            "state mismatch or replayed callback",
        ) from exc
    except OAuthError as exc:
        if exc.error == "invalid_client":
            message = _(
                "The identity provider refused the console's client credentials: check OIDC_CLIENT_ID and "
                "OIDC_CLIENT_SECRET."
            )
        else:
            message = _("The identity provider refused the sign-in: %(error)s") % {"error": exc.error or exc}
        raise SignInError(message, f"provider error: {exc.error}: {exc.description}") from exc
    except (requests.RequestException, ValueError) as exc:  # no answer, or not the JSON a token endpoint sends
        raise _provider_down(exc) from exc
    except JoseError as exc:  # a bad signature, a wrong audience, issuer or nonce, an expired token
        message = _("The identity provider's ID token did not verify (%(error)s). Nobody was signed in.")
        raise SignInError(
            message % {"error": exc.description or exc.error}, f"id token refused: {exc.error}: {exc.description}"
        ) from exc
    if not token.get("userinfo"):
        raise SignInError(_("The identity provider sent no ID token. Nobody was signed in."), "no id token")
    claims = dict(token["userinfo"])
    if settings.OIDC_GROUPS_CLAIM not in claims or settings.OIDC_USERNAME_CLAIM not in claims:
        try:
            userinfo = dict(app.userinfo(token=token))
        except (requests.RequestException, OAuthError, ValueError) as exc:
            raise SignInError(
                _("The identity provider did not give the user's details (userinfo)."), f"userinfo failed: {exc}"
            ) from exc
        if userinfo.get("sub") != claims.get("sub"):  # OpenID Connect Core 5.3.2: else it is someone else's
            raise SignInError(
                _("The identity provider's user details are about someone else. Nobody was signed in."),
                "userinfo sub differs from the id token's",
            )
        claims = {**userinfo, **claims}
    return claims


def _groups(claims: dict[str, Any]) -> list[str]:
    value = claims.get(settings.OIDC_GROUPS_CLAIM, [])
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(group, str) for group in value):
        raise SignInError(_("The identity provider's groups claim is not a list of names."), "malformed groups claim")
    return value


def _account(claims: dict[str, Any]) -> tuple[Any, str]:
    """The console account of these claims (made on first sign-in) and the provider subject it is bound to."""
    username = claims.get(settings.OIDC_USERNAME_CLAIM)
    subject = f"{settings.OIDC_ISSUER} {claims.get('sub', '')}"
    try:
        if not isinstance(username, str) or not username or len(username) > 150:
            raise ValidationError("no user name")
        UnicodeUsernameValidator()(username)
    except ValidationError as exc:
        message = _("The identity provider gave no usable user name (claim %(claim)s).")
        raise SignInError(message % {"claim": settings.OIDC_USERNAME_CLAIM}, f"bad user name: {username!r}") from exc
    existing = get_user_model().objects.filter(username__iexact=username).select_related("profile").first()
    if existing is None:
        user = get_user_model()(username=username)
        user.set_unusable_password()  # signs in through the provider only
    else:
        profile = getattr(existing, "profile", None)
        if profile is None or profile.source != SOURCE or (profile.subject and profile.subject != subject):
            raise SignInError(
                _(
                    "An account named %(user)s exists in the console and is not this identity provider's. "
                    "Ask an administrator."
                )
                % {"user": username},
                "user name taken by another account",
            )
        user = existing
    user.email = claims.get("email", "") if isinstance(claims.get("email"), str) else user.email
    user.first_name = str(claims.get("given_name", ""))[:150]
    user.last_name = str(claims.get("family_name", ""))[:150]
    user.save()
    return user, subject


def finish(request: HttpRequest) -> str:
    """Sign in the person the provider's answer names; where to go next."""
    if request.GET.get("error"):
        raise SignInError(
            _("The identity provider did not sign you in: %(error)s")
            % {"error": request.GET.get("error_description") or request.GET["error"]},
            f"provider answered {request.GET['error']}",
        )
    claims = _exchange(request)
    groups = _groups(claims)
    mapping = map_groups(groups, settings.OIDC_ROLE_GROUPS, settings.OIDC_DEPARTMENT_GROUPS)
    with transaction.atomic():
        user, subject = _account(claims)
        allowed = apply(request, user, mapping, SOURCE)  # refused: the account deactivated, kept so
        Profile.objects.filter(user=user).update(subject=subject)
    if not allowed:
        raise SignInError(refusal_message(), "in no mapped group")
    login(request, user, backend=SESSION_BACKEND)
    record_sign_in(request, user, mapping, SOURCE)
    return request.session.pop(NEXT, "") or ""


def failed(request: HttpRequest, error: SignInError) -> None:
    """The audit event of a sign-in that did not happen."""
    record(request, "auth.directory_login", outcome="failed", detail={"via": SOURCE, "reason": error.reason})


def test_connection() -> dict[str, Any]:
    """Fetch the discovery document and the provider's signing keys: what the Settings page's button shows."""
    started = time.perf_counter()
    result: dict[str, Any] = {"ok": False, "keys": 0, "message": ""}
    if not enabled():
        result["message"] = _("OpenID Connect sign-in is off: OIDC_ISSUER is not set.")
        return result
    app = client()
    try:
        metadata = _metadata(app)
        missing = [name for name in ("authorization_endpoint", "token_endpoint", "jwks_uri") if not metadata.get(name)]
        methods = metadata.get("code_challenge_methods_supported")
        if missing:
            result["message"] = _("The discovery document lacks %(fields)s.") % {"fields": ", ".join(missing)}
        elif methods is not None and "S256" not in methods:
            result["message"] = _("The provider does not offer PKCE with S256, which the console requires.")
        else:
            keys = app.fetch_jwk_set().get("keys", [])
            result.update(ok=bool(keys), keys=len(keys))
            result["message"] = (
                ngettext(
                    "Discovery document and signing keys read; %(keys)d key found.",
                    "Discovery document and signing keys read; %(keys)d keys found.",
                    len(keys),
                )
                % {"keys": len(keys)}
                if keys
                else _("The provider publishes no signing keys.")
            )
    except SignInError as exc:
        result["message"] = exc.message
    except (requests.RequestException, ValueError) as exc:
        result["message"] = _("The identity provider refused or did not answer: %(error)s") % {
            "error": type(exc).__name__
        }
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def shown_settings() -> list[tuple[str, str]]:
    """The OpenID Connect settings for the Settings page: the secret masked."""
    return [
        ("OIDC_ISSUER", settings.OIDC_ISSUER),
        ("OIDC_CLIENT_ID", settings.OIDC_CLIENT_ID),
        ("OIDC_CLIENT_SECRET", "••••••••" if settings.OIDC_CLIENT_SECRET else ""),
        ("OIDC_SCOPES", settings.OIDC_SCOPES),
        ("OIDC_USERNAME_CLAIM", settings.OIDC_USERNAME_CLAIM),
        ("OIDC_GROUPS_CLAIM", settings.OIDC_GROUPS_CLAIM),
        ("OIDC_BUTTON_LABEL", settings.OIDC_BUTTON_LABEL),
        ("OIDC_TIMEOUT_SECONDS", str(settings.OIDC_TIMEOUT_SECONDS)),
    ]
