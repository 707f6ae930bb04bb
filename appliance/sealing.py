"""Encryption at rest for secrets the console must use again (hub tokens): Fernet with a key
derived from SECRET_KEY. Changing SECRET_KEY makes stored secrets unreadable, and says so."""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


class SealedSecretUnreadable(Exception):
    """The stored secret was sealed with another SECRET_KEY (or is damaged)."""


def _fernet() -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"appliance-console-sealing").derive(
        settings.SECRET_KEY.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def seal(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def unseal(sealed: str) -> str:
    try:
        return _fernet().decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise SealedSecretUnreadable(
            "A stored secret cannot be decrypted: SECRET_KEY changed since it was saved. Enter it again."
        ) from None
