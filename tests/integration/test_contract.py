"""Contract tests generated from the committed OpenAPI document (schemathesis) against the
running service: for every operation, requests that fit the schema and requests that
break it. No answer may be a 5xx, and every answer must be one the document declares: its
status code, content type, headers and body schema.

Excluded, with why:
- positive_data_acceptance: a request that fits the schema may still name a job, output or
  receipt that does not exist (404) or upload bytes that are no photo (415/422); those
  refusals are declared, and correct.
- use_after_free / ensure_resource_availability / object_level_authorization: stateful
  link checks for APIs that declare OpenAPI links; ours declares none (the account
  scoping is tested directly in test_service.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    ensure_resource_availability,
    object_level_authorization,
    positive_data_acceptance,
    use_after_free,
)

from pipeline.state import keys
from tests.integration.conftest import API_TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.security]

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
# The bearer scheme as schemathesis' OpenAPI-aware auth: every case carries the token, except
# the ones that test what happens without it (ignored_auth: they must get a 401).
schema = schemathesis.openapi.from_path(DOCUMENT, config=SchemathesisConfig.from_dict(
    {"auth": {"openapi": {"bearer": {"bearer": API_TOKEN}}}}))

EXCLUDED = [positive_data_acceptance, use_after_free, ensure_resource_availability,
            object_level_authorization]


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_inside_its_contract(case, service):
    case.call_and_validate(base_url=service.base_url, timeout=60, excluded_checks=EXCLUDED)


# -- hostile requests the schema cannot describe ------------------------------------------

HOSTILE = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def raw(service):
    import httpx

    with httpx.Client(base_url=service.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        yield client


@HOSTILE
@given(body=st.binary(max_size=2048), boundary=st.from_regex(r"[!-~]{0,70}", fullmatch=True))
def test_a_malformed_multipart_body_is_a_4xx_and_leaves_nothing(raw, redis_client, body, boundary):
    jobs_before = redis_client.scard(keys.ACTIVE_JOBS)
    response = raw.post("/v1/jobs", content=body, headers={
        "content-type": f"multipart/form-data; boundary={boundary}",
        "x-device-key": "A" * 43 + "="})
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error", "detail"}
    assert redis_client.scard(keys.ACTIVE_JOBS) == jobs_before


@HOSTILE
@given(account=st.text(max_size=70), object_id=st.text(max_size=70),
       route=st.sampled_from(["jobs", "outputs", "deletions"]))
def test_any_id_with_unicode_control_characters_or_traversal_is_a_clean_4xx(
        raw, account, object_id, route):
    from urllib.parse import quote

    path = f"/v1/accounts/{quote(account, safe='')}/{route}/{quote(object_id, safe='')}"
    for candidate in (path, path.replace("%2F", "/"), "/v1/accounts/../../etc/passwd"):
        response = raw.get(candidate)
        assert response.status_code in (404, 405, 422), (candidate, response.text)
        assert set(response.json()) == {"error", "detail"}


def test_an_oversized_header_is_refused_without_a_5xx(raw):
    import httpx

    for size in (16 * 1024, 256 * 1024):
        try:
            response = raw.get("/v1/accounts/acct-1/jobs", headers={"X-Padding": "a" * size})
        except httpx.RemoteProtocolError:  # the server closed the connection: also fine
            continue
        assert response.status_code < 500, response.status_code
