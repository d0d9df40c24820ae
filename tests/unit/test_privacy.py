"""Privacy bookkeeping without Redis: deadlines in business days, late requests, pseudonyms."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.privacy.rights import PrivacyRequest, RequestKind, add_business_days, late_requests
from pipeline.security import pseudonyms

pytestmark = pytest.mark.privacy


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_ten_business_days_skip_weekends():
    friday = _ts("2026-11-20T09:30:00")
    assert add_business_days(friday, 10) == _ts("2026-12-04T09:30:00")
    assert add_business_days(_ts("2026-11-23T00:00:00"), 1) == _ts("2026-11-24T00:00:00")


def test_late_requests_name_the_missed_deadline():
    received = _ts("2026-01-05T12:00:00")
    unacked = PrivacyRequest("a", RequestKind.DELETE, "ref", received)
    acked = PrivacyRequest("b", RequestKind.DELETE, "ref", received, acknowledged_s=received)
    done = PrivacyRequest("c", RequestKind.KNOW, "ref", received, acknowledged_s=received,
                          completed_s=received + 60)
    assert late_requests([unacked, acked, done], received + 86400) == []
    after_ack_deadline = late_requests([unacked, acked, done], _ts("2026-01-20T12:00:01"))
    assert [(r.request_id, "acknowledged" in why) for r, why in after_ack_deadline] == [
        ("a", True)]
    after_45_days = late_requests([acked, done], received + 45 * 86400 + 1)
    assert [(r.request_id, "45 days" in why) for r, why in after_45_days] == [("b", True)]


def test_account_refs_are_keyed_stable_and_not_the_plain_hash(monkeypatch):
    import hashlib

    monkeypatch.setenv(pseudonyms.SECRET_ENV, "a" * 40)
    first = pseudonyms.account_ref("alice")
    assert first == pseudonyms.account_ref("alice") and len(first) == 32
    assert first != pseudonyms.account_ref("bob")
    assert first not in hashlib.sha256(b"ephemera-account:alice").hexdigest()
    monkeypatch.setenv(pseudonyms.SECRET_ENV, "b" * 40)
    assert pseudonyms.account_ref("alice") != first  # without the secret, no link


def test_production_needs_a_real_secret(monkeypatch):
    """More in tests/unit/test_secrets.py (every production marker, the cluster's secret)."""
    monkeypatch.setattr(pseudonyms, "_demo_refused", False)
    monkeypatch.delenv(pseudonyms.AGGREGATE_SECRET_ENV, raising=False)
    monkeypatch.delenv(pseudonyms.SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=pseudonyms.SECRET_ENV):
        pseudonyms.check_secrets(["service.yaml ray_address"])
    monkeypatch.setenv(pseudonyms.SECRET_ENV, "short")
    with pytest.raises(ValueError):
        pseudonyms.check_secrets([])
    monkeypatch.setenv(pseudonyms.SECRET_ENV, "x" * 32)
    pseudonyms.check_secrets([])
