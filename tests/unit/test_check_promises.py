"""scripts/check_promises.py counts a mutation as caught only when a named guard test fails
on an assertion; errors, other exceptions and empty runs are reported as such."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.check_promises import read_junit

GUARD = ("tests/unit/test_crypto.py",)


def junit(tmp_path: Path, body: str, tests: int = 1) -> Path:
    path = tmp_path / "report.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" '
                    f'tests="{tests}">{body}</testsuite></testsuites>')
    return path


CASE = '<testcase classname="tests.unit.test_crypto" name="test_wrong_key_is_refused">{}</testcase>'


@pytest.mark.parametrize("inner, verdict", [
    ('<failure message="assert b\'x\' != b\'x\'">tb</failure>', "caught"),
    ('<failure message="AssertionError: the key opened it">tb</failure>', "caught"),
    ('<failure message="Failed: DID NOT RAISE">tb</failure>', "caught"),
    ('<failure message="KeyError: \'nonce\'">tb</failure>', "error"),
    ('<error message="failed on setup with &quot;RuntimeError: Ray did not start&quot;">'
     'tb</error>', "error"),
    ("", "pass"),
])
def test_only_an_assertion_in_a_guard_test_is_a_catch(tmp_path, inner, verdict):
    assert read_junit(junit(tmp_path, CASE.format(inner)), GUARD)[0] == verdict


def test_an_assertion_in_another_test_is_no_catch(tmp_path):
    other = ('<testcase classname="tests.unit.test_media" name="test_x">'
             '<failure message="assert False">tb</failure></testcase>')
    assert read_junit(junit(tmp_path, other), GUARD)[0] == "error"


def test_a_collection_error_or_no_report_is_an_error(tmp_path):
    collection = ('<testcase classname="" name="tests.unit.test_crypto">'
                  '<error message="collection failure">tb</error></testcase>')
    assert read_junit(junit(tmp_path, collection), GUARD)[0] == "error"
    assert read_junit(junit(tmp_path, "", tests=0), GUARD)[0] == "error"
    assert read_junit(tmp_path / "missing.xml", GUARD)[0] == "error"
