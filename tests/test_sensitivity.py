"""Sensitivity rules: recordings refused by what their metadata says, and fail closed without it.

Unit cases for the rules, then jitgate in front of a fake PostHog (tests/metadatakit.py)
whose recording demo-1 starts on /billing/invoices: real Redis, a real audit file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sensitivity: {id: x}", "sensitivity: must be a list of rules"),
        ("sensitivity: [{id: x}]", "needs urls or properties"),
        ("sensitivity: [{id: x, urls: [/a/*], action: warn}]", "must be block"),
        ("sensitivity: [{id: x, urls: [/a]}, {id: x, urls: [/b]}]", "used by an earlier rule"),
        ("sensitivity: [{id: x, properties: {plan: {a: 1}}}]", "must be a value or a list"),
        ("sensitivity: [{id: x, urls: [/a], colour: red}]", "unknown field"),
    ],
)
def test_bad_rules_are_refused_with_their_place(text: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as err:
        compile_text("routes: []\n" + text, "policy.yaml")
    assert message in str(err.value) and "policy.yaml:2" in str(err.value)
    if "earlier rule" not in message:  # a schema cannot see duplicate ids
        assert schema_errors("routes: []\n" + text) != []


@pytest.fixture
async def tool(aiohttp_server: Any) -> FakeTool:
    return await fake_tool(aiohttp_server)


async def start(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool, metadata: bool = True
) -> Any:
    (tmp_path / "token").write_text(TOKEN)
    policy = (ROOT / "config" / "policy.yaml").read_text() + RULES
    extra = "metadata: {adapter: posthog, token_file: token, subject: {audit: plain}}"
    return await make_proxy(
        upstream_url=tool.url, policy_text=policy, extra=extra if metadata else ""
    )


async def granted_get(client: Any, user: str, recording: str) -> Any:
    headers = {"Authorization": f"Bearer {make_token(user)}", "Accept": "application/json"}
    r = await client.post(
        "/_jit/api/requests",
        json={"scope": f"recording:1/{recording}", "reason": "ticket 7", "duration": "5m"},
        headers=headers,
    )
    assert r.status == 201, await r.text()
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
    r = await granted_get(client, "alice", "demo-2")
    assert r.status == 200
    assert await metric(client, "blocked") == 1
    await client.app[STATE].audit.flush(force=True)
    path = client.app[STATE].settings.audit.file.path
    records = [json.loads(x) for x in path.read_text().splitlines()]
    refused = [r for r in records if r["event"] == "access.deny"]
    assert [(r["recording"], r["decision"], r["status"]) for r in refused] == [
        ("demo-1", "blocked", 403)
    ]
    assert "includes /billing/*" in refused[0]["reasons"][0]
    # Only what was served reached the upstream.
    assert tool.hits.count(SNAPSHOTS.format("demo-1")) == 0


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
