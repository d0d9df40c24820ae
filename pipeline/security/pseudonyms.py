"""Keyed pseudonyms of account ids, for everything that outlives a request: deletion
receipts, output folders in the bucket, usage records, the under-13 block.

``account_ref`` is an HMAC-SHA256 of the account id under a server secret taken from the
environment variable ``EPHEMERA_ACCOUNT_SECRET`` (at least 32 characters). Without the
secret a guessable account id cannot be found in a bucket listing or a receipt, and the
same id maps to the same ref everywhere, so receipts stay verifiable and an account's
outputs findable. ``EPHEMERA_AGGREGATE_SECRET`` (at least 32 characters) is the base of the
monthly keys of usage aggregates (pipeline/privacy/usage.py).

Fail closed (docs/ARCHITECTURE.md): every process that computes a pseudonym calls
``check_secrets`` with its config's production markers at start. A production-shaped
process refuses to start without both secrets and, once checked, never falls back to a demo
secret. A secret shorter than 32 characters is refused everywhere, the demo included. Only
the embedded loopback demo (no marker) runs on the fixed, public demo secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

SECRET_ENV = "EPHEMERA_ACCOUNT_SECRET"
AGGREGATE_SECRET_ENV = "EPHEMERA_AGGREGATE_SECRET"
DEMO_SECRET = b"ephemera-demo-account-secret--not-for-production"
DEMO_AGGREGATE_SECRET = b"ephemera-demo-aggregate-secret--not-for-production"
MIN_SECRET_CHARS = 32
_FINGERPRINT_LABEL = b"ephemera-account-secret-fingerprint-v1"
_DEMOS = {SECRET_ENV: DEMO_SECRET, AGGREGATE_SECRET_ENV: DEMO_AGGREGATE_SECRET}
# Set by ``check_secrets`` in a production-shaped process: from then on a missing secret
# raises instead of falling back to the public demo secret.
_demo_refused = False


def _read(name: str) -> bytes:
    value = os.environ.get(name, "")
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise ValueError(f"{name} holds {len(value)} characters; it needs at least "
                             f"{MIN_SECRET_CHARS} random characters (e.g. `openssl rand -hex "
                             "32`)")
        return value.encode()
    if _demo_refused:
        raise ValueError(f"{name} is not set in this production-shaped process; set it "
                         f"(at least {MIN_SECRET_CHARS} random characters)")
    return _DEMOS[name]


def _secret() -> bytes:
    return _read(SECRET_ENV)


def aggregate_secret() -> bytes:
    """The base of usage aggregates' monthly keys (``EPHEMERA_AGGREGATE_SECRET``)."""
    return _read(AGGREGATE_SECRET_ENV)


def check_secrets(markers: Sequence[str]) -> None:
    """Refuse to start a process that computes pseudonyms without real secrets.

    ``markers``: the config's ``Settings.production_markers``. With any marker, both
    ``EPHEMERA_ACCOUNT_SECRET`` and ``EPHEMERA_AGGREGATE_SECRET`` must hold at least 32
    characters, and this process never falls back to a demo secret afterwards. Without
    one (the embedded loopback demo) an unset secret means the public demo secret, but a
    short one is still refused. Raises ValueError naming the variable and the markers.
    """
    global _demo_refused
    for name in (SECRET_ENV, AGGREGATE_SECRET_ENV):
        value = os.environ.get(name, "")
        if markers and len(value) < MIN_SECRET_CHARS:
            what = "is not set" if not value else f"holds only {len(value)} characters"
            raise ValueError(f"{name} {what}; this config is production-shaped "
                             f"({', '.join(markers)}), which needs it with at least "
                             f"{MIN_SECRET_CHARS} random characters (account ids are "
                             "pseudonymised with it in receipts, bucket keys and usage data)")
        _read(name)  # a short secret is refused without any marker too
    if markers:
        _demo_refused = True


def secret_fingerprint() -> str:
    """An HMAC-SHA256 of a fixed label under the account secret: equal on two nodes only
    when their secrets are equal, and neither the secret nor a plain hash of it."""
    return hmac.new(_secret(), _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()


def keyed_id(purpose: str, value: str) -> str:
    """32 hex characters, stable for one secret, underivable from ``value`` without it."""
    return hmac.new(_secret(), f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


def account_ref(account_id: str) -> str:
    """The account's pseudonym."""
    return keyed_id("account", account_id)
