"""The JWT attack table against a running jitgate (tests/jwtattack.py; `make harden` too).

Every forged token is answered 401, reaches nothing upstream and leaves an
`unauthenticated` audit record that carries its reason and reason code (the JSON refusal
carries the same code); a burst of made-up kids costs the
JWKS server at most one fetch; the attacker's key server is never contacted.
"""

from __future__ import annotations

import pytest
from jwtattack import ATTACKS, INVALID_TOKEN, Outcome, Report, run

from proxy.identity.keyset import REASON_CODES

EXP = "token_expired"
BAD = INVALID_TOKEN


async def test_every_attack_is_refused_with_its_reason_and_code_audited(redis_url: str) -> None:
    report = await run(redis_url, burst=50)
    assert report.failures == []
    assert [o.name for o in report.outcomes] == [name for name, *_ in ATTACKS]
    assert report.control == 200 and report.burst_refused == 50 and report.burst_fetches <= 1


@pytest.mark.parametrize(
    ("outcome", "ok"),
    [
        (Outcome("x", 401, ["token expired"], "token expired", EXP, EXP, EXP, BAD), True),
        (Outcome("x", 401, ["malformed token"], "token expired", EXP, EXP, EXP, BAD), False),
        (Outcome("x", 401, [], "token expired", None, EXP, EXP, BAD), False),  # no audit record
        (Outcome("x", 403, ["token expired"], "token expired", EXP, EXP, EXP, BAD), False),
        (Outcome("x", 401, ["token expired"], "token expired", None, EXP, EXP, BAD), False),
        (Outcome("x", 401, ["token expired"], "token expired", "alg_none", EXP, EXP, BAD), False),
        (Outcome("x", 401, ["token expired"], "token expired", EXP, EXP, None, BAD), False),
        (Outcome("x", 401, ["token expired"], "token expired", EXP, EXP, EXP, "Bearer"), False),
    ],
)
def test_an_outcome_can_fail(outcome: Outcome, ok: bool) -> None:
    assert outcome.ok is ok


def test_a_report_can_fail() -> None:
    report = Report(control=200, upstream_hits=1, burst=10, burst_refused=10, burst_fetches=2)
    assert report.failures == ["burst: 10 of 10 refused, 2 JWKS fetches (at most 1)"]
    assert Report(control=200, upstream_hits=2, burst=1, burst_refused=1).failures != []


def test_every_code_in_the_table_is_a_documented_one() -> None:
    assert {code for *_, code in ATTACKS} <= REASON_CODES
