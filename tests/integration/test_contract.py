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
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    ensure_resource_availability,
    object_level_authorization,
    positive_data_acceptance,
    use_after_free,
)

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
