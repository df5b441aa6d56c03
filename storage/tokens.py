"""Secrets the registry checks without keeping them: device credentials and enrollment tokens."""

import hashlib
import secrets


def new_token() -> str:
    """256 random bits, URL-safe. Shown once to whoever receives it; only its hash is stored."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # The tokens are 256-bit random, so a plain hash is as good as a slow KDF here.
    return hashlib.sha256(token.encode()).hexdigest()
