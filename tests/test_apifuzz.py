"""schemathesis against a running jitgate's OpenAPI document, short and seeded
(tests/apifuzz.py; `make harden` runs it longer): no 5xx, no answer outside the document,
for an admin, an approver and a plain user.
"""

from __future__ import annotations

import pytest
from apifuzz import ROLES, Report, RoleRun, fuzz


@pytest.mark.timeout(300)
def test_the_api_answers_as_documented(redis_url: str) -> None:
    report = fuzz(redis_url, examples=5, seed=1)
    assert [r.role for r in report.runs] == list(ROLES)
    assert report.failures == []
    assert all(r.cases > 0 for r in report.runs)


def test_a_run_without_cases_or_with_a_failure_fails() -> None:
    report = Report([RoleRun("admin", 10, True), RoleRun("user", 0, False, "no cases")])
    assert report.failures == ["user:\nno cases"]
    assert "failures as user" in report.line()
