"""Sensitivity rules: recordings refused by what their metadata says, and fail closed without it.

Unit cases for the rules, then jitgate in front of a fake PostHog (tests/metadatakit.py)
whose recording demo-1 starts on /billing/invoices: real Redis, a real audit file.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, ProxyFactory, make_token
from metadatakit import TOKEN, FakeTool, fake_tool
from test_policy_schema import schema_errors

from proxy.errors import ConfigErrors
from proxy.policyfile import compile_text
from proxy.sensitivity import matching
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/{}/snapshots"
RULES = """
sensitivity:
  - id: billing
    urls: [/billing/*]
  - id: fintech
    reason: only the billing team may see fintech customers
    properties: {customer_type: [fintech, bank], verified: true}
  - id: partner-site
    urls: "https://partner.example/*"
"""


def rules(text: str = RULES) -> Any:
    return compile_text("routes: []\n" + text, "policy.yaml").sensitivity


@pytest.mark.parametrize(
    ("meta", "rule"),
    [
        ({"start_url": "https://shop.example/billing/card", "urls": []}, "billing"),
        ({"start_url": "https://shop.example/", "urls": ["https://shop.example/billing/x"]},
         "billing"),
        ({"start_url": "https://shop.example/billing", "urls": []}, None),  # /billing/* only
        ({"urls": ["https://partner.example/home"]}, "partner-site"),
        ({"urls": ["https://shop.example/partner.example/"]}, None),
        ({"properties": {"customer_type": "bank", "verified": True}}, "fintech"),
        ({"properties": {"customer_type": ["fintech"], "verified": "true"}}, "fintech"),
        ({"properties": {"customer_type": "bank"}}, None),  # every condition must hold
        ({"properties": {"customer_type": "retail", "verified": True}}, None),
        ({}, None),
    ],
)  # fmt: skip
def test_rules_match_urls_and_properties(meta: dict[str, Any], rule: str | None) -> None:
    found = matching(rules(), meta)
    assert (found.id if found else None) == rule


def test_reasons_say_what_the_recording_holds() -> None:
    billing, fintech, _ = rules()
    assert billing.reason == "this recording includes /billing/* (sensitivity rule 'billing')"
    assert fintech.reason == "only the billing team may see fintech customers"
    assert schema_errors("routes: []\n" + RULES) == []
    assert schema_errors((ROOT / "config" / "policy.yaml").read_text() + REQUIRE) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sensitivity: {id: x}", "sensitivity: must be a list of rules"),
        ("sensitivity: [{id: x}]", "needs urls or properties"),
        ("sensitivity: [{id: x, urls: [/a/*], action: warn}]", "must be block"),
        ("sensitivity: [{id: x, urls: [/a]}, {id: x, urls: [/b]}]", "used by an earlier rule"),
        ("sensitivity: [{id: x, properties: {plan: {a: 1}}}]", "must be a value or a list"),
        ("sensitivity: [{id: x, urls: [/a], colour: red}]", "unknown field"),
        ("sensitivity: [{id: x, urls: [/a], action: require}]", "goes with action: require"),
        ("sensitivity: [{id: x, urls: [/a], entitlements: [e]}]", "goes with action: require"),
        (
            "sensitivity: [{id: x, urls: [/a], action: require, entitlements: [nope]}]",
            "no entitlement 'nope'",
        ),
    ],
)
def test_bad_rules_are_refused_with_their_place(text: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as err:
        compile_text("routes: []\n" + text, "policy.yaml")
    assert message in str(err.value) and "policy.yaml:2" in str(err.value)
    if "earlier rule" not in message and "nope" not in message:  # ids are beyond a schema
        assert schema_errors("routes: []\n" + text) != []


@pytest.fixture
async def tool(aiohttp_server: Any) -> FakeTool:
    return await fake_tool(aiohttp_server)


REQUIRE = """
  - id: billing-review
    description: Billing leads approve access to recordings of billing pages
    scopes: ["recording:{project}/{recording}"]
    who: any
    durations: {offered: [5m], default: 5m, max: 15m}
    reason: required
    ticket: {pattern: '^BILL-\\d+$'}
    approval: {mode: approvers, count: 1, approvers: {groups: [billing-leads]}}
sensitivity:
  - id: billing
    urls: [/billing/*]
    action: require
    entitlements: [billing-review]
"""


async def start(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool, metadata: bool = True,
    rules: str = RULES, base: str | None = None,
) -> Any:  # fmt: skip
    (tmp_path / "token").write_text(TOKEN)
    policy = (base or (ROOT / "config" / "policy.yaml").read_text()) + rules
    extra = "metadata: {adapter: posthog, token_file: token, subject: {audit: plain}}"
    return await make_proxy(
        upstream_url=tool.url, policy_text=policy, extra=extra if metadata else ""
    )


async def granted_get(client: Any, user: str, recording: str) -> Any:
    """GET a recording under a grant an admin gave (the access-time check, not the request's)."""
    await client.app[STATE].grants.add(user, f"recording:1/{recording}", 300, "ticket 7", "sam")
    headers = {"Authorization": f"Bearer {make_token(user)}", "Accept": "application/json"}
    return await client.get(SNAPSHOTS.format(recording), headers=headers)


async def metric(client: Any, outcome: str) -> float:
    text = await (await client.get("/_jit/metrics")).text()
    prefix = f'jitgate_sensitivity_refusals_total{{outcome="{outcome}"}} '
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix))


async def test_a_sensitive_recording_is_refused_under_a_grant(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool)
    r = await granted_get(client, "alice", "demo-1")  # starts on /billing/invoices
    assert r.status == 403
    body = await r.json()
    assert body["reasons"] == ["this recording includes /billing/* (sensitivity rule 'billing')"]
    page = await client.get(
        SNAPSHOTS.format("demo-1"),
        headers={"Authorization": f"Bearer {make_token('alice')}", "Accept": "text/html"},
    )
    assert page.status == 403 and "this recording includes /billing/*" in await page.text()
    r = await granted_get(client, "alice", "demo-2")
    assert r.status == 200
    assert await metric(client, "blocked") == 2
    await client.app[STATE].audit.flush(force=True)
    path = client.app[STATE].settings.audit.file.path
    records = [json.loads(x) for x in path.read_text().splitlines()]
    refused = [r for r in records if r["event"] == "access.deny"]
    assert [(r["recording"], r["decision"], r["status"]) for r in refused] == [
        ("demo-1", "blocked", 403),
        ("demo-1", "blocked", 403),
    ]
    assert "includes /billing/*" in refused[0]["reasons"][0]
    # Only what was served reached the upstream.
    assert tool.hits.count(SNAPSHOTS.format("demo-1")) == 0


async def test_a_visited_url_counts_as_the_start_url_does(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    rules = "sensitivity:\n  - id: orders\n    urls: [/orders/*]\n"
    client = await start(make_proxy, tmp_path, tool, rules=rules)
    r = await granted_get(client, "alice", "demo-2")  # starts on /, visits /orders/77
    assert r.status == 403
    assert (await r.json())["reasons"] == [
        "this recording includes /orders/* (sensitivity rule 'orders')"
    ]
    assert (await granted_get(client, "alice", "demo-3")).status == 200


async def test_unknown_metadata_fails_closed(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool)
    tool.status = 500
    r = await granted_get(client, "bob", "demo-3")
    assert r.status == 503
    (reason,) = (await r.json())["reasons"]
    assert reason == (
        "sensitivity rules apply and the metadata of recording:1/demo-3 is unknown "
        "(posthog answered 500 for recording:1/demo-3's metadata): failing closed"
    )
    assert await metric(client, "unknown") >= 1
    tool.status = 200  # the tool is back: the next request asks again
    r = await client.get(
        SNAPSHOTS.format("demo-3"), headers={"Authorization": f"Bearer {make_token('bob')}"}
    )
    assert r.status == 200
    assert tool.hits.count(SNAPSHOTS.format("demo-3")) == 1


async def test_rules_without_metadata_fail_closed(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, metadata=False)
    r = await granted_get(client, "alice", "demo-2")
    assert r.status == 503
    assert "no metadata section is configured" in (await r.json())["reasons"][0]


async def test_a_require_rule_lets_only_its_entitlements_open_the_recording(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, rules=REQUIRE)
    alice = {"Authorization": f"Bearer {make_token('alice')}", "Accept": "application/json"}
    ask = {"scope": "recording:1/demo-1", "reason": "refund", "duration": "5m"}
    # demo-1 starts on /billing/invoices: billing-review applies, not the auto-approved rule.
    r = await client.post("/_jit/api/requests", json=ask, headers=alice)
    assert r.status == 400 and "BILL-" in (await r.json())["message"]
    r = await client.post("/_jit/api/requests", json={**ask, "ticket": "BILL-7"}, headers=alice)
    grant = await r.json()
    assert r.status == 201 and grant["state"] == "pending"
    assert grant["entitlement"] == "billing-review"
    lead = {"Authorization": f"Bearer {make_token('lena', groups=['billing-leads'])}"}
    r = await client.post(f"/_jit/api/grants/{grant['id']}/approve", json={}, headers=lead)
    assert r.status == 200, await r.text()
    assert (await client.get(SNAPSHOTS.format("demo-1"), headers=alice)).status == 200
    # demo-2 is not sensitive: the demo's auto-approved rule still applies.
    r = await client.post("/_jit/api/requests", json={**ask, "scope": "recording:1/demo-2"},
                          headers=alice)  # fmt: skip
    assert r.status == 201 and (await r.json())["entitlement"] == "demo-recordings"
    assert (await client.get(SNAPSHOTS.format("demo-2"), headers=alice)).status == 200
    # A grant for the whole project, not under billing-review, does not open demo-1.
    await client.app[STATE].grants.add("bob", "project:1", 300, "audit", "sam")
    bob = {"Authorization": f"Bearer {make_token('bob')}", "Accept": "application/json"}
    r = await client.get(SNAPSHOTS.format("demo-1"), headers=bob)
    assert r.status == 403
    assert (await r.json())["reasons"] == [
        "this recording includes /billing/* (sensitivity rule 'billing'): it needs a grant "
        "under billing-review"
    ]
    assert (await client.get(SNAPSHOTS.format("demo-2"), headers=bob)).status == 200


async def test_requests_for_blocked_or_unknown_recordings_are_refused(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool)
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    ask = {"scope": "recording:1/demo-1", "reason": "x", "duration": "5m"}
    r = await client.post("/_jit/api/requests", json=ask, headers=headers)
    assert r.status == 403 and (await r.json())["error"] == "sensitive"
    tool.status = 500
    r = await client.post("/_jit/api/requests", json={**ask, "scope": "recording:1/demo-3"},
                          headers=headers)  # fmt: skip
    assert r.status == 503 and "failing closed" in (await r.json())["message"]


JITGATE = str(Path(sys.executable).parent / "jitgate")
BILLING = {"start_url": "https://shop.example/billing/invoices", "urls": []}


async def run_jitgate(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        JITGATE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_policy_test_takes_metadata_fixtures(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text((ROOT / "config" / "policy.yaml").read_text() + REQUIRE)
    (tmp_path / "billing.json").write_text(json.dumps(BILLING))
    case = "request: GET " + SNAPSHOTS.format("demo-1") + "\n    user: alice\n"
    case += '    grants: ["recording:1/demo-1"]\n'
    (tmp_path / "tests.yaml").write_text(
        f"""cases:
  - name: billing pages need billing-review
    {case}    metadata: billing.json
    entitlement: demo-recordings
    expect: deny
    expect_status: 403
  - name: under billing-review they open
    {case}    metadata: billing.json
    entitlement: billing-review
    expect: allow
  - name: other pages open under any grant
    {case}    metadata: {{start_url: "https://shop.example/cart"}}
    expect: allow
  - name: without metadata the rules are not considered
    {case}    expect: allow
"""
    )
    code, out, err = await run_jitgate("policy", "test", str(tmp_path / "tests.yaml"))
    assert code == 0, out + err
    assert out.strip().endswith("4 passed, 0 failed")
    (tmp_path / "bad.yaml").write_text(
        f"cases:\n  - name: x\n    {case}    metadata: {{visited: []}}\n    expect: allow\n"
    )
    code, _, err = await run_jitgate("policy", "test", str(tmp_path / "bad.yaml"))
    assert code == 1 and "bad.yaml:6: cases[0].metadata: must be a mapping of" in err


async def test_policy_explain_takes_metadata(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, rules=REQUIRE)
    await client.app[STATE].grants.add("alice", "project:1", 300, "audit", "sam")
    (tmp_path / "billing.yaml").write_text(yaml.safe_dump(BILLING))
    cfg = str(client.app[STATE].settings.file)
    explain = ("policy", "explain", "--config", cfg, "--user", "alice")
    target = ("GET", SNAPSHOTS.format("demo-1"))
    code, out, err = await run_jitgate(
        *explain, "--metadata", str(tmp_path / "billing.yaml"), *target
    )
    assert code == 1, err
    assert "it needs a grant under billing-review" in out
    code, out, _ = await run_jitgate(*explain, *target)
    assert code == 0 and "decision    allow" in out
    code, _, err = await run_jitgate(*explain, "--metadata", str(tmp_path / "nope.json"), *target)
    assert code == 2 and "--metadata: cannot read" in err
