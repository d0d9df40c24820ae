"""Keyed pseudonyms of account ids, for everything that outlives a request: deletion
receipts, output folders in the bucket, usage records.

``account_ref`` is an HMAC-SHA256 of the account id under a server secret taken from the
environment variable ``EPHEMERA_ACCOUNT_SECRET`` (at least 32 characters). Without the
secret a guessable account id cannot be found in a bucket listing or a receipt, and the
same id maps to the same ref everywhere, so receipts stay verifiable and an account's
outputs findable. The embedded demo runs with a fixed, public demo secret; any
production-shaped config refuses to start without the variable (``check_secret``).
"""

from __future__ import annotations

import hashlib
import hmac
import os

SECRET_ENV = "EPHEMERA_ACCOUNT_SECRET"
DEMO_SECRET = b"ephemera-demo-account-secret--not-for-production"
MIN_SECRET_CHARS = 32


def _secret() -> bytes:
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else DEMO_SECRET


def has_secret() -> bool:
    return len(os.environ.get(SECRET_ENV, "")) >= MIN_SECRET_CHARS


def check_secret() -> None:
    """Refuse to serve users without a real secret (called where a production-shaped config
    starts)."""
    if not has_secret():
        raise ValueError(f"set {SECRET_ENV} (at least {MIN_SECRET_CHARS} random characters): "
                         "account ids are pseudonymised with it in receipts, bucket keys and "
                         "usage data")


def keyed_id(purpose: str, value: str) -> str:
    """32 hex characters, stable for one secret, underivable from ``value`` without it."""
    return hmac.new(_secret(), f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


def account_ref(account_id: str) -> str:
    """The account's pseudonym."""
    return keyed_id("account", account_id)
