"""API keys (stored as sha256 hashes, found by their public id) and encryption of per-job hub tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken

from app.core.config import settings

KEY_PREFIX = "awqf"


@dataclass(frozen=True)
class NewApiKey:
    key_id: str
    secret: str  # the whole key, shown once

    @property
    def key_hash(self) -> str:
        return hash_key(self.secret)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> NewApiKey:
    """`awqf_<key id>_<secret>`: the id finds the row, the sha256 of the whole key is compared."""
    key_id = secrets.token_hex(8)
    return NewApiKey(key_id=key_id, secret=f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}")


def parse_key_id(key: str) -> str | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def key_matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)


def _fernet() -> Fernet:
    digest = hashlib.sha256(b"awqforge-publish-token:" + settings.secret_key().encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt_secret(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def decrypt_secret(token: str) -> str | None:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        return None
