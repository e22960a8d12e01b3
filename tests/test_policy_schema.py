"""config/policy.schema.json against the shipped policy and the policy compiler."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from conftest import ROOT
from jsonschema import Draft202012Validator

from proxy.errors import ConfigErrors
from proxy.policyfile import _ENTITLEMENT_FIELDS, compile_text

SCHEMA = json.loads((ROOT / "config" / "policy.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(text: str) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(yaml.safe_load(text))]


def entitlement(**fields: Any) -> str:
    """Return a policy holding one auto-approved entitlement, with fields replaced or added."""
    base: dict[str, Any] = {
        "id": "e",
        "scopes": ["s:{a}"],
        "who": "any",
        "durations": {"default": "1h"},
        "approval": {"mode": "auto"},
    }
    rule = {k: v for k, v in {**base, **fields}.items() if v is not None}
    return yaml.safe_dump({"routes": [], "entitlements": [rule]})


APPROVERS = {"mode": "approvers", "approvers": {"groups": ["sec"]}}


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(SCHEMA)


def test_shipped_policy_is_schema_valid() -> None:
    text = (ROOT / "config" / "policy.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=policy.schema.json\n")
    assert schema_errors(text) == []


def test_schema_knows_every_entitlement_field() -> None:
    fields = SCHEMA["$defs"]["entitlement"]["properties"]
    assert sorted(fields) == sorted(_ENTITLEMENT_FIELDS)


GOOD = {
    "minimal": "routes: []\n",
    "routes": """
version: 1
default: public
routes:
  - {id: a, path: /, access: identity, description: root}
  - {id: b.c_d-1, methods: GET, path: "/x/{p}", scope: "x:{p}"}
  - {id: c, methods: "*", path: /y, subpaths: true, access: blocked}
  - {id: d, methods: [get, POST], path: /z/, access: public}
  - {id: e, methods: ["*"], path: /w, access: public}
""",
    "hierarchy": """
routes: []
hierarchy:
  - {scope: "r:{o}/{p}", covered_by: "p:{o}/{p}"}
  - {scope: "p:{o}/{p}", covered_by: ["o:{o}", all]}
  - {scope: "all", covered_by: []}
""",
    "entitlement-minimal": entitlement(),
    "entitlement-full": entitlement(
        description="everything spelled out",
        scopes=["recording:1/{recording}", "project:{project}"],
        who={"groups": ["support"], "users": ["carol"]},
        durations={"offered": ["15m", 3600, "4h"], "default": 3600, "max": "1d"},
        reason="optional",
        ticket={"pattern": r"^(INC|SUP)-\d+$"},
        pending_ttl=1800,
        approval={"mode": "approvers", "count": 2, "approvers": {"groups": ["l"], "users": ["d"]}},
        extend={"requires_approval": False},
        break_glass=False,
    ),
    "who-users-only": entitlement(who={"users": ["carol"]}),
    "approvers-users-only": entitlement(
        approval={"mode": "approvers", "count": 2, "approvers": {"users": ["a", "b"]}}
    ),
    "break-glass": entitlement(approval=APPROVERS, break_glass=True, reason="required"),
    "extend-false-with-auto": entitlement(extend={"requires_approval": False}),
    "extend-true-with-approvers": entitlement(
        approval=APPROVERS, extend={"requires_approval": True}
    ),
    "durations-in-seconds": entitlement(durations={"offered": [60, 90.5], "default": 60}),
    "durations-combined": entitlement(durations={"default": "1h30m", "max": "1D"}),
}


@pytest.mark.parametrize("text", GOOD.values(), ids=GOOD.keys())
def test_good_policies_compile_and_are_schema_valid(text: str) -> None:
    compile_text(text, "t.yaml")
    assert schema_errors(text) == []


BAD = {
    "unknown-top-level-field": "routes: []\nnope: 1\n",
    "version-2": "version: 2\nroutes: []\n",
    "default-protected": "default: protected\nroutes: []\n",
    "routes-missing": "default: public\n",
    "bad-access": "routes:\n  - {id: a, path: /x, access: open}\n",
    "unknown-route-field": "routes:\n  - {id: a, path: /x, access: public, colour: red}\n",
    "protected-without-scope": "routes:\n  - {id: a, path: /x}\n",
    "public-with-scope": "routes:\n  - {id: a, path: /x, access: public, scope: x}\n",
    "relative-path": "routes:\n  - {id: a, path: x, access: public}\n",
    "bad-route-id": "routes:\n  - {id: 'a b', path: /x, access: public}\n",
    "bad-method": "routes:\n  - {id: a, path: /x, access: public, methods: ['G ET']}\n",
    "star-among-methods": "routes:\n  - {id: a, path: /x, access: public, methods: [GET, '*']}\n",
    "unknown-cover-field": "routes: []\nhierarchy:\n  - {scope: a, covered_by: [b], x: 1}\n",
    "entitlements-not-a-list": "routes: []\nentitlements: {}\n",
    "unknown-entitlement-field": entitlement(colour="red"),
    "bad-approval-mode": entitlement(approval={"mode": "vote"}),
    "approval-missing": entitlement(approval=None),
    "approvers-missing": entitlement(approval={"mode": "approvers"}),
    "count-zero": entitlement(approval={**APPROVERS, "count": 0}),
    "count-with-auto": entitlement(approval={"mode": "auto", "count": 1}),
    "approvers-with-auto": entitlement(approval={"mode": "auto", "approvers": {"users": ["a"]}}),
    "empty-approvers": entitlement(approval={"mode": "approvers", "approvers": {}}),
    "who-missing": entitlement(who=None),
    "who-everyone": entitlement(who="everyone"),
    "who-empty-groups": entitlement(who={"groups": []}),
    "who-unknown-field": entitlement(who={"teams": ["a"]}),
    "scopes-empty": entitlement(scopes=[]),
    "scope-malformed-braces": entitlement(scopes=["s:{a"]),
    "scope-bad-parameter": entitlement(scopes=["s:{1a}"]),
    "durations-missing": entitlement(durations=None),
    "default-missing": entitlement(durations={"max": "1h"}),
    "bad-duration": entitlement(durations={"default": "soon"}),
    "negative-duration": entitlement(durations={"default": -5}),
    "offered-empty": entitlement(durations={"offered": [], "default": "1h"}),
    "unknown-durations-field": entitlement(durations={"default": "1h", "min": "1m"}),
    "bad-reason": entitlement(reason="maybe"),
    "ticket-without-pattern": entitlement(ticket={}),
    "ticket-bad-regex": entitlement(ticket={"pattern": "(INC"}),
    "bad-pending-ttl": entitlement(pending_ttl="soon"),
    "extend-needs-approvers": entitlement(extend={"requires_approval": True}),
    "break-glass-with-auto": entitlement(break_glass=True),
    "break-glass-reason-optional": entitlement(
        approval=APPROVERS, break_glass=True, reason="optional"
    ),
    "break-glass-not-bool": entitlement(break_glass="yes"),
}


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_bad_policies_fail_both(text: str) -> None:
    with pytest.raises(ConfigErrors):
        compile_text(text, "t.yaml")
    assert schema_errors(text) != []


# Checks only the compiler makes: they relate values to each other in ways a schema cannot
# say. Listed so that a schema change that starts catching one moves it to BAD.
COMPILER_ONLY = {
    "duplicate-route-id": "routes:\n  - {id: a, path: /x, access: public}\n"
    "  - {id: a, path: /y, access: public}\n",
    "scope-unknown-parameter": "routes:\n  - {id: a, path: '/x/{p}', scope: 'r:{q}'}\n",
    "duplicate-entitlement-id": yaml.safe_dump(
        {"routes": [], "entitlements": [yaml.safe_load(entitlement())["entitlements"][0]] * 2}
    ),
    "default-over-max": entitlement(durations={"default": "8h", "max": "4h"}),
    "default-not-offered": entitlement(durations={"offered": ["15m"], "default": "1h"}),
    "zero-duration-text": entitlement(durations={"default": "0s"}),
    "count-over-named-users": entitlement(
        approval={"mode": "approvers", "count": 2, "approvers": {"users": ["a"]}}
    ),
}


@pytest.mark.parametrize("text", COMPILER_ONLY.values(), ids=COMPILER_ONLY.keys())
def test_compiler_only_checks(text: str) -> None:
    with pytest.raises(ConfigErrors):
        compile_text(text, "t.yaml")
    assert schema_errors(text) == []
