"""A FAKE OpenID Connect provider for the tests: a real HTTP server, in a process of its own, that speaks
the protocol the console's client (Authlib) speaks to a real provider.

- ``/.well-known/openid-configuration``: the discovery document;
- ``/jwks``: its RSA signing key (made at start);
- ``/authorize``: checks the client, the registered redirect URI, ``response_type=code``, the
  ``openid`` scope, a state, a nonce and a PKCE challenge (S256 only), then shows a sign-in form
  (user name and password) and sends the browser back with a one-time code;
- ``/token``: checks the client secret (HTTP Basic or form), the code (once, for that client and
  redirect URI) and the PKCE verifier, and answers an access token and an RS256-signed ID token with
  the nonce;
- ``/userinfo``: the user's claims with their ``groups``, for the access token.

Fake only in what it knows: a few users with passwords and groups (below), one client. The tests
change them through ``/_fake/...`` (groups of a user, a redirect URI to allow, and a way to
misbehave: an ID token with a bad signature, another audience, another nonce or another issuer, or
userinfo about another subject).

Run: ``python tests/appliance/oidc_provider.py PORT CLIENT_ID CLIENT_SECRET``; ``FakeOidcProvider``
starts and stops it as the tests' fixtures do with slapd.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

CLIENT_ID = "console"
CLIENT_SECRET = "fake-oidc-client-secret"
# user name -> (password, groups, email)
USERS: dict[str, tuple[str, list[str], str]] = {
    "alice": ("alice-pw", ["ml-admins", "staff"], "alice@example.org"),
    "fiona": ("fiona-pw", ["finance", "staff"], "fiona@example.org"),
    "nobody": ("nobody-pw", ["staff"], "nobody@example.org"),
    "lee": ("lee-pw", ["ml-admins"], "lee@example.org"),
    # The browser suite's, apart from the LDAP directory's people it also signs in.
    "olga": ("olga-pw", ["ml-admins"], "olga@example.org"),
    "farid": ("farid-pw", ["finance"], "farid@example.org"),
    "norm": ("norm-pw", ["staff"], "norm@example.org"),
}
MODES = ("", "bad-signature", "wrong-audience", "wrong-nonce", "wrong-issuer", "userinfo-other-sub")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(number: int) -> str:
    return b64url(number.to_bytes((number.bit_length() + 7) // 8, "big"))


class Provider:
    """The provider's state: its key, clients' codes and tokens, the users' groups, how it misbehaves."""

    def __init__(self, issuer: str, client_id: str, client_secret: str) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer, self.client_id, self.client_secret = issuer, client_id, client_secret
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # for bad signatures
        self.kid = secrets.token_hex(4)
        self.redirect_uris: set[str] = set()
        self.codes: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}  # access token -> user name
        self.groups = {name: list(user[1]) for name, user in USERS.items()}
        self.mode = ""
        self.lock = threading.Lock()

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "profile", "email", "groups"],
            "claims_supported": ["sub", "preferred_username", "email", "groups"],
        }

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                          "n": _int_b64(numbers.n), "e": _int_b64(numbers.e)}]}  # fmt: skip

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}".encode()
        key = self.other_key if self.mode == "bad-signature" else self.key
        return signing_input.decode() + "." + b64url(key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))

    def id_token(self, grant: dict[str, Any]) -> str:
        user = grant["user"]
        now = int(time.time())
        claims = {
            "iss": "https://someone-else.example" if self.mode == "wrong-issuer" else self.issuer,
            "sub": f"sub-{user}",
            # for another client, which it names as the authorized party (an ID token must still be refused)
            "aud": ["someone-else"] if self.mode == "wrong-audience" else self.client_id,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
            "nonce": "not-the-consoles-nonce" if self.mode == "wrong-nonce" else grant["nonce"],
            "preferred_username": user,
            "email": USERS[user][2],
        }
        if self.mode == "wrong-audience":
            claims["azp"] = self.client_id
        return self.sign(claims)


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("fake-oidc: " + (format % args) + "\n")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", headers)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(raw or "{}")
        return {key: values[0] for key, values in parse_qs(raw, keep_blank_values=True).items()}

    def _page(self, status: int, title: str, body: str) -> None:
        page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                "<style>body{font-family:sans-serif;max-width:28em;margin:4em auto}label{display:block;margin:.6em 0}"
                "input{display:block;width:100%}p.fake{color:#a00}</style></head><body>"
                f"<h1>{html.escape(title)}</h1><p class='fake'>FAKE OpenID Connect provider (tests only)</p>"
                f"{body}</body></html>")  # fmt: skip
        self._send(status, page.encode(), "text/html; charset=utf-8")

    # --- the protocol -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        provider = self.server.provider
        url = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if url.path == "/.well-known/openid-configuration":
            self._json(200, provider.discovery())
        elif url.path == "/jwks":
            self._json(200, provider.jwks())
        elif url.path == "/authorize":
            problem = self._authorize_problem(query)
            if problem:
                self._page(400, "Sign-in refused", f"<p id='error'>{html.escape(problem)}</p>")
            else:
                self._login_form(query, "")
        elif url.path == "/userinfo":
            self._userinfo()
        else:
            self._json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/authorize":
            self._sign_in(self._form())
        elif path == "/token":
            self._token(self._form())
        elif path.startswith("/_fake/"):
            self._control(path.removeprefix("/_fake/"), self._form())
        else:
            self._json(404, {"error": "not_found"})

    def _authorize_problem(self, query: dict[str, str]) -> str:
        provider = self.server.provider
        if query.get("client_id") != provider.client_id:
            return "unknown client_id"
        if query.get("redirect_uri") not in provider.redirect_uris:
            return f"redirect_uri not registered: {query.get('redirect_uri')}"
        if query.get("response_type") != "code":
            return "response_type must be code"
        if "openid" not in query.get("scope", "").split():
            return "the openid scope is required"
        if not query.get("state") or not query.get("nonce"):
            return "state and nonce are required"
        if not query.get("code_challenge") or query.get("code_challenge_method") != "S256":
            return "PKCE with code_challenge_method=S256 is required"
        return ""

    def _login_form(self, query: dict[str, str], error: str) -> None:
        hidden = "".join(f"<input type='hidden' name='{html.escape(k)}' value='{html.escape(v)}'>"
                         for k, v in query.items() if k not in ("username", "password"))  # fmt: skip
        problem = f"<p id='error' role='alert'>{html.escape(error)}</p>" if error else ""
        self._page(200 if not error else 401, "Sign in to the FAKE provider",
                   f"{problem}<form method='post' action='/authorize'>{hidden}"
                   "<label for='username'>Username<input id='username' name='username' autocomplete='username'></label>"
                   "<label for='password'>Password<input id='password' name='password' type='password'></label>"
                   "<button type='submit'>Sign in</button></form>")  # fmt: skip

    def _sign_in(self, form: dict[str, str]) -> None:
        provider = self.server.provider
        problem = self._authorize_problem(form)
        if problem:
            self._page(400, "Sign-in refused", f"<p id='error'>{html.escape(problem)}</p>")
            return
        user = form.get("username", "")
        if user not in USERS or not secrets.compare_digest(USERS[user][0], form.get("password", "")):
            self._login_form(form, "Wrong user name or password.")
            return
        code = secrets.token_urlsafe(24)
        with provider.lock:
            provider.codes[code] = {"user": user, "client_id": form["client_id"], "nonce": form["nonce"],
                                    "redirect_uri": form["redirect_uri"], "challenge": form["code_challenge"],
                                    "expires": time.time() + 60}  # fmt: skip
        target = form["redirect_uri"] + "?" + urlencode({"code": code, "state": form["state"]})
        self._send(302, b"", "text/plain", {"Location": target})

    def _client_authenticated(self, form: dict[str, str]) -> bool:
        provider = self.server.provider
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                client_id, _sep, secret = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return False
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        from urllib.parse import unquote_plus

        return unquote_plus(client_id) == provider.client_id and secrets.compare_digest(
            unquote_plus(secret), provider.client_secret
        )

    def _token(self, form: dict[str, str]) -> None:
        provider = self.server.provider
        if not self._client_authenticated(form):
            self._json(401, {"error": "invalid_client", "error_description": "client authentication failed"},
                       {"WWW-Authenticate": 'Basic realm="fake-oidc"'})  # fmt: skip
            return
        if form.get("grant_type") != "authorization_code":
            self._json(400, {"error": "unsupported_grant_type"})
            return
        with provider.lock:
            grant = provider.codes.pop(form.get("code", ""), None)  # once only
        if grant is None or grant["expires"] < time.time() or grant["client_id"] != provider.client_id:
            self._json(400, {"error": "invalid_grant", "error_description": "unknown, used or expired code"})
            return
        if form.get("redirect_uri") != grant["redirect_uri"]:
            self._json(400, {"error": "invalid_grant", "error_description": "redirect_uri differs"})
            return
        verifier = form.get("code_verifier", "")
        if not verifier or b64url(hashlib.sha256(verifier.encode()).digest()) != grant["challenge"]:
            self._json(400, {"error": "invalid_grant", "error_description": "PKCE verification failed"})
            return
        access = secrets.token_urlsafe(24)
        with provider.lock:
            provider.tokens[access] = grant["user"]
        self._json(200, {"access_token": access, "token_type": "Bearer", "expires_in": 300,
                         "scope": "openid profile email", "id_token": provider.id_token(grant)})  # fmt: skip

    def _userinfo(self) -> None:
        provider = self.server.provider
        header = self.headers.get("Authorization", "")
        user = provider.tokens.get(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        if user is None:
            self._json(401, {"error": "invalid_token"}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return
        sub = "sub-someone-else" if provider.mode == "userinfo-other-sub" else f"sub-{user}"
        self._json(200, {"sub": sub, "preferred_username": user, "email": USERS[user][2],
                         "groups": provider.groups[user]})  # fmt: skip

    def _control(self, what: str, data: dict[str, Any]) -> None:
        provider = self.server.provider
        with provider.lock:
            if what == "redirect":
                provider.redirect_uris.add(data["uri"])
            elif what == "groups":
                provider.groups[data["user"]] = list(data["groups"])
            elif what == "mode" and data.get("mode", "") in MODES:
                provider.mode = data.get("mode", "")
            else:
                self._json(400, {"error": f"unknown control {what}"})
                return
        self._json(200, {"ok": True})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, client_id: str, client_secret: str) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.provider = Provider(f"http://127.0.0.1:{port}", client_id, client_secret)


class FakeOidcProvider:
    """The fake provider in a process of its own, on a free port (``start``/``stop``, as ``Slapd``)."""

    def __init__(self, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET) -> None:
        from tests.models_catalog.helpers import free_port

        self.port = free_port()
        self.client_id, self.client_secret = client_id, client_secret
        self.process: subprocess.Popen | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeOidcProvider:
        import httpx

        self.process = subprocess.Popen([sys.executable, str(Path(__file__)), str(self.port), self.client_id,
                                         self.client_secret], stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the fake OpenID Connect provider exited"
            try:
                httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("the fake OpenID Connect provider did not start")

    def stop(self) -> None:
        from tests.processes import end  # here: this file also runs as the provider's own script

        end(self.process)

    def _control(self, what: str, **data: Any) -> None:
        import httpx

        httpx.post(f"{self.issuer}/_fake/{what}", json=data, timeout=5).raise_for_status()

    def allow_redirect(self, uri: str) -> None:
        """Register a redirect URI of the client (as an admin does at a real provider)."""
        self._control("redirect", uri=uri)

    def set_groups(self, user: str, groups: list[str]) -> None:
        self._control("groups", user=user, groups=groups)

    def misbehave(self, mode: str) -> None:
        """From now on, ID tokens with ``mode``'s flaw ("" for none)."""
        self._control("mode", mode=mode)


if __name__ == "__main__":
    port, client_id, client_secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    Server(port, client_id, client_secret).serve_forever()
