"""Webhook notifications, delivered to a real local receiver by real proxies on real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import ProxyFactory, demo_policy, free_port
from test_api import ADMIN, ALICE, BOB, CAROL, ENTITLEMENTS, MALLORY, get, post, who
from waiting import eventually

from proxy.app import build_app
from proxy.grants import Grant
from proxy.metrics import Metrics
from proxy.notify import Notifier, slack_message
from proxy.settings import NotificationSettings, WebhookSettings
from proxy.settings.read import Secret
from proxy.state import STATE

FAST = {"backoff": 0.01}  # retries in tests wait milliseconds, not seconds


@dataclass
class Call:
    path: str
    body: Any
    headers: dict[str, str]
    at: float
    status: int | None = None  # None until answered


@dataclass
class Receiver:
    """A real webhook receiver that records every POST and answers as a test tells it."""

    server: TestServer
    calls: list[Call] = field(default_factory=list)  # every attempt, failed ones too
    fail_first: int = 0  # answer 500 to this many POSTs first
    hold: asyncio.Event | None = None  # when set: wait for it (up to 3 s) before answering

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def got(self, path: str | None = None, *, answered: bool = True) -> list[Any]:
        """Return the bodies POSTed (to one path or any), only those answered 2xx by default."""
        return [
            c.body
            for c in self.calls
            if path in (None, c.path) and (c.status == 200 or not answered)
        ]

    async def wait(
        self, n: int, path: str | None = None, *, answered: bool = True, within: float = 15.0
    ) -> list[Any]:
        try:
            await eventually(
                lambda: len(self.got(path, answered=answered)) >= n, within=within, interval=0.01
            )
        except AssertionError:
            raise AssertionError(f"not {n} messages: {self.calls}") from None
        return self.got(path, answered=answered)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    holder: list[Receiver] = []

    async def hook(request: web.Request) -> web.Response:
        me = holder[0]
        body = await request.json()
        status = 500 if sum(c.path == request.path for c in me.calls) < me.fail_first else 200
        call = Call(request.path, body, dict(request.headers), time.monotonic())
        me.calls.append(call)
        if me.hold is not None:
            await asyncio.wait_for(me.hold.wait(), 3)
        call.status = status
        return web.json_response({"ok": status == 200}, status=status)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    holder.append(Receiver(await aiohttp_server(app)))
    return holder[0]


def notifications(*hooks: str, **options: object) -> str:
    """Return a config section: admins as in test_api, and these webhooks (YAML flow maps)."""
    lines = ["admins: {groups: [security]}", "notifications:"]
    lines += [f"  {key}: {value}" for key, value in options.items()]
    lines += ["  webhooks:", *(f"    - {hook}" for hook in hooks)]
    return "\n".join(lines)


Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start(make_proxy: ProxyFactory) -> Start:
    """Start jitgate with test_api's entitlements and the given notification config."""

    async def factory(*hooks: str, **options: object) -> TestClient:
        policy = demo_policy(ENTITLEMENTS)
        client: TestClient = await make_proxy(
            policy_text=policy, extra=notifications(*hooks, **options)
        )
        return client

    return factory


async def metric(client: TestClient, name: str, event: str) -> float:
    text = await (await client.get("/_jit/metrics")).text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{event="{event}"}} '):
            return float(line.split()[-1])
    return 0.0


async def counted(client: TestClient, kind: str, event: str, want: float) -> None:
    """Wait until /_jit/metrics shows jitgate_notifications_{kind}_total{event} == want."""
    name = f"jitgate_notifications_{kind}_total"
    got: list[float] = []

    async def reached() -> bool:
        got.append(await metric(client, name, event))
        return got[-1] == want

    try:
        await eventually(reached)
    except AssertionError:
        raise AssertionError(f"{name}{{event={event!r}}} is {got[-1]}, not {want}") from None


async def test_slack_and_json_messages_for_request_approve_deny(
    start: Start, receiver: Receiver
) -> None:
    slack_url, json_url = receiver.url("/slack"), receiver.url("/json")
    proxy = await start(
        f"{{url: '{slack_url}', format: slack}}",
        f"{{url: '{json_url}', format: json, events: [requested, approved, denied]}}",
        public_url="https://jitgate.example.com/",
        **FAST,
    )
    version = proxy.app[STATE].config.policy.version

    status, g = await post(
        proxy, "/requests", ALICE, scope="project:1", reason="customer bug", ticket="INC-42",
        duration="1h",
    )  # fmt: skip
    assert status == 201 and g["state"] == "pending"
    (slack,) = await receiver.wait(1, "/slack")
    (plain,) = await receiver.wait(1, "/json")
    link = f"https://jitgate.example.com/_jit/api/grants/{g['id']}"
    assert slack["text"] == (
        "alice requested access to project:1; needs 2 approvals. "
        f"Reason: customer bug; ticket INC-42; for 1h. Grant <{link}|{g['id']}>"
    )
    headline, facts, context = slack["blocks"]
    assert headline["text"]["text"].startswith(":inbox_tray: alice requested access")
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in facts["fields"]}
    assert fields["*User*"] == "alice" and fields["*Scope*"] == "`project:1`"
    assert (fields["*Reason*"], fields["*Ticket*"], fields["*Duration*"]) == (
        "customer bug", "INC-42", "1h",
    )  # fmt: skip
    assert fields["*State*"] == "pending" and fields["*Decide by*"].endswith(" UTC")
    assert (
        context["elements"][0]["text"] == f"jitgate · grant <{link}|{g['id']}> · policy {version}"
    )
    assert plain["event"] == "requested" and plain["grant"] == g
    assert plain["policy_version"] == version and plain["time"].endswith("+00:00")
    call = receiver.calls[0]
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["X-Jitgate-Event"] == "requested" and call.headers["X-Jitgate-Delivery"]

    await post(proxy, f"/grants/{g['id']}/approve", BOB)  # one of two: no message yet
    status, active = await post(proxy, f"/grants/{g['id']}/approve", CAROL)
    assert status == 200 and active["state"] == "active"
    slack = (await receiver.wait(2, "/slack"))[1]
    plain = (await receiver.wait(2, "/json"))[1]
    assert slack["text"].startswith("alice's access to project:1 was approved by bob,carol.")
    assert (plain["event"], plain["grant"]) == ("approved", active)

    _, other = await post(proxy, "/requests", ALICE, scope="project:2", reason="x", ticket="SUP-9")
    status, denied = await post(proxy, f"/grants/{other['id']}/deny", BOB, comment="not needed")
    assert status == 200
    slack = (await receiver.wait(4, "/slack"))[3]
    plain = (await receiver.wait(4, "/json"))[3]
    assert slack["text"].startswith("alice's request for project:2 was denied by bob.")
    assert "*Comment*\nnot needed" in [f["text"] for f in slack["blocks"][1]["fields"]]
    assert (plain["event"], plain["grant"]) == ("denied", denied)

    # Auto-approved: "requested" only; there was nobody to approve it.
    status, auto = await post(proxy, "/requests", MALLORY, scope="recording:1/demo-1", reason="y")
    assert status == 201 and auto["state"] == "active"
    slack = (await receiver.wait(5, "/slack"))[4]
    plain = (await receiver.wait(5, "/json"))[4]
    assert slack["text"].startswith(
        "mallory requested access to recording:1/demo-1; active at once"
    )
    assert (plain["event"], plain["grant"]) == ("requested", auto)
    await asyncio.sleep(0.1)  # intended: no message more arrives
    assert len(receiver.calls) == 10
    assert [b["event"] for b in receiver.got("/json")] == [
        "requested", "approved", "requested", "denied", "requested",
    ]  # fmt: skip
    await counted(proxy, "sent", "requested", 6)
    await counted(proxy, "sent", "approved", 2)


async def test_break_glass_alert(start: Start, receiver: Receiver) -> None:
    proxy = await start(
        f"{{url: '{receiver.url('/alerts')}', format: slack, events: [break_glass]}}",
        f"{{url: '{receiver.url('/all')}'}}",
        **FAST,
    )
    olga = who("olga", "oncall")
    reason = "db down <!channel> & <https://evil.example|click>"
    status, g = await post(
        proxy, "/requests", olga, scope="project:1", reason=reason, break_glass=True
    )
    assert status == 201 and g["state"] == "active"
    (alert,) = await receiver.wait(1, "/alerts")
    assert alert["text"].startswith(
        "BREAK-GLASS: olga took emergency access to project:1; "
        "a follow-up review by another person is required. "
    )
    assert alert["blocks"][0]["text"]["text"].startswith(":rotating_light: *BREAK-GLASS")
    # Requester text cannot become a Slack mention or link.
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in alert["text"]
    assert "<!channel>" not in str(alert) and "<https://evil" not in str(alert)
    assert f"`{g['id']}`" in alert["text"]  # no public_url: the id, without a link
    assert "*Review*" not in str(alert["blocks"])  # nor where to review it
    plain = await receiver.wait(2, "/all")
    assert [(b["event"], b["grant"]["id"]) for b in plain] == [
        ("requested", g["id"]), ("break_glass", g["id"]),
    ]  # fmt: skip
    assert plain[1]["grant"]["break_glass"] is True


async def test_failing_receiver_gets_the_message_on_a_retry(
    start: Start, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    proxy = await start(f"{{url: '{receiver.url('/hook')}'}}", retries=4, backoff=0.05)
    _, g = await post(proxy, "/requests", MALLORY, scope="recording:1/demo-1", reason="x")
    (body,) = await receiver.wait(1)
    assert (body["event"], body["grant"]["id"]) == ("requested", g["id"])
    first, second, third = receiver.calls
    assert [c.status for c in receiver.calls] == [500, 500, 200]
    assert len({c.headers["X-Jitgate-Delivery"] for c in receiver.calls}) == 1
    assert second.at - first.at >= 0.05 and third.at - second.at >= 0.1  # backoff doubles
    await counted(proxy, "sent", "requested", 1)
    assert await metric(proxy, "jitgate_notifications_failed_total", "requested") == 0


async def test_dead_receiver_is_counted_as_a_failure(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "jitgate.notify")
    dead = f"http://127.0.0.1:{free_port()}/hook/secret-token"  # nothing listens there
    proxy = await start(f"{{url: '{dead}'}}", retries=2, **FAST)
    began = time.monotonic()
    status, g = await post(proxy, "/requests", MALLORY, scope="recording:1/demo-1", reason="x")
    assert status == 201 and time.monotonic() - began < 1
    await counted(proxy, "failed", "requested", 1)
    assert await metric(proxy, "jitgate_notifications_sent_total", "requested") == 0
    failed = [r.getMessage() for r in caplog.records if "failed after 3 attempts" in r.getMessage()]
    assert len(failed) == 1 and g["id"] in failed[0]
    assert "secret-token" not in caplog.text  # the URL's path may be its credential


async def test_slow_receiver_does_not_slow_the_api(start: Start, receiver: Receiver) -> None:
    receiver.hold = asyncio.Event()  # the receiver answers only after up to 3 s
    proxy = await start(f"{{url: '{receiver.url('/hook')}'}}", **FAST)
    began = time.monotonic()
    status, g = await post(proxy, "/requests", ALICE, scope="project:1", reason="x", ticket="INC-1")
    assert status == 201
    await post(proxy, f"/grants/{g['id']}/approve", BOB)
    status, _ = await post(proxy, f"/grants/{g['id']}/approve", CAROL)
    assert status == 200
    assert time.monotonic() - began < 1
    await receiver.wait(1, answered=False)  # the first is at the receiver, unanswered
    assert proxy.app[STATE].notifier.backlog() == 2  # the second waits its turn
    receiver.hold.set()
    assert [b["event"] for b in await receiver.wait(2)] == ["requested", "approved"]
    await counted(proxy, "sent", "approved", 1)


async def test_expiring_is_sent_once_by_two_replicas(
    start: Start, receiver: Receiver, aiohttp_client: Any
) -> None:
    hook = f"{{url: '{receiver.url('/hook')}', events: [expiring]}}"
    first = await start(hook, expiring_before="20m", check_interval=0.05, **FAST)
    second: TestClient = await aiohttp_client(build_app(first.app[STATE].settings))
    _, soon = await post(first, "/requests", MALLORY, scope="recording:1/a", reason="x")
    _, later = await post(
        second, "/requests", MALLORY, scope="recording:1/b", reason="x", duration="1h"
    )
    assert soon["expires_at"] - time.time() > 14 * 60  # 15m: inside the 20m window
    looks = [0, 0]  # how often each replica has looked for grants about to expire
    for i, notifier in enumerate(p.app[STATE].notifier for p in (first, second)):

        async def counting(
            now: float | None = None, _i: int = i, _look: Any = notifier.check_expiring
        ) -> int:
            looks[_i] += 1
            return int(await _look(now))

        notifier.check_expiring = counting
    await receiver.wait(1)
    # Each replica looks ten more times and delivers what it queued: still one message.
    after = list(looks)
    await eventually(
        lambda: (
            all(n >= m + 10 for n, m in zip(looks, after, strict=True))
            and not any(p.app[STATE].notifier.backlog() for p in (first, second))
        ),
        what="ten more looks by each replica",
    )
    (body,) = receiver.got()
    assert (body["event"], body["grant"]["id"]) == ("expiring", soon["id"])
    assert len(receiver.calls) == 1
    mark = f"jit:notified:expiring:{soon['id']}"
    ttl = await first.app[STATE].redis.pttl(mark)
    assert 15 * 60_000 < ttl <= 16 * 60_000  # until the grant's end, and a minute more
    assert await first.app[STATE].redis.exists(f"jit:notified:expiring:{later['id']}") == 0
    sent = [
        await metric(p, "jitgate_notifications_sent_total", "expiring") for p in (first, second)
    ]
    assert sorted(sent) == [0, 1]


async def test_slack_messages_for_expiring_and_break_glass() -> None:
    now = time.time()
    grant = Grant(
        "g-1", "alice", "project:1", now - 600, now + 299.6, "INC-1 outage", "bob",
        duration=900, activated_at=now - 600, break_glass=True,
    )  # fmt: skip
    msg = slack_message("expiring", grant, link=None, now=now)
    assert msg["text"].startswith("alice's access to project:1 expires in 5m. Reason: INC-1 outage")
    assert msg["blocks"][0]["text"]["text"].startswith(":hourglass_flowing_sand: ")
    link = "https://jitgate.example.com/_jit/api/grants/g-1"
    msg = slack_message("break_glass", grant, link=link, now=now)
    fields = [f["text"] for f in msg["blocks"][1]["fields"]]
    assert "*State*\nactive (break-glass)" in fields
    assert f"*Review*\n`POST {link}/review`" in fields


def sample(m: Metrics, kind: str, event: str) -> float:
    return m.registry.get_sample_value(f"jitgate_notifications_{kind}_total", {"event": event}) or 0


def _hook(url: str = "http://127.0.0.1:9/x") -> WebhookSettings:
    return WebhookSettings(url=Secret(url))


def _grant(n: int = 1) -> Grant:
    return Grant(f"g-{n}", "alice", "project:1", time.time(), 0.0, "r", "", state="pending")


async def test_a_full_queue_is_counted_never_silent(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    notifier = Notifier(NotificationSettings(queue_max=2, webhooks=(_hook(),)), metrics=m)
    with caplog.at_level(logging.ERROR, "jitgate.notify"):
        for n in range(3):
            notifier.notify("requested", _grant(n))  # not started: nothing is taken out
    assert sample(m, "dropped", "requested") == 1
    assert "requested notification for grant g-2 to http://127.0.0.1:9 not sent: queue full" in (
        caplog.text
    )
    await notifier.close(grace=0.05)  # the two queued are counted as not sent, too
    assert sample(m, "dropped", "requested") == 3
    notifier.notify("requested", _grant())  # after close
    assert sample(m, "dropped", "requested") == 4


async def test_shutdown_delivers_what_it_can_then_counts_the_rest(receiver: Receiver) -> None:
    m = Metrics()
    hooks = (_hook(receiver.url("/quick")),)
    notifier = Notifier(NotificationSettings(webhooks=hooks), metrics=m)
    await notifier.start()
    for n in range(5):
        notifier.notify("requested", _grant(n))
    await notifier.close()
    assert len(receiver.got("/quick")) == 5  # all drained before the session closed
    assert sample(m, "sent", "requested") == 5

    receiver.hold = asyncio.Event()  # now a receiver that does not answer in time
    notifier = Notifier(NotificationSettings(webhooks=(_hook(receiver.url("/stuck")),)), metrics=m)
    await notifier.start()
    notifier.notify("denied", _grant())
    began = time.monotonic()
    await notifier.close(grace=0.2)
    assert time.monotonic() - began < 1
    assert sample(m, "dropped", "denied") == 1
    receiver.hold.set()


async def test_no_webhooks_no_notifier(start: Start) -> None:
    proxy = await start()
    assert proxy.app[STATE].notifier is None
    status, _ = await get(proxy, "/grants/unreviewed", ADMIN)
    assert status == 200


async def test_extension_request_and_its_approval(start: Start, receiver: Receiver) -> None:
    proxy = await start(
        f"{{url: '{receiver.url('/slack')}', format: slack}}",
        f"{{url: '{receiver.url('/json')}', events: [requested, approved]}}",
        public_url="https://jitgate.example.com",
        **FAST,
    )
    _, g = await post(
        proxy, "/requests", ALICE, scope="project:1", reason="customer bug", ticket="INC-42",
        duration="1h",
    )  # fmt: skip
    await post(proxy, f"/grants/{g['id']}/approve", BOB)
    await post(proxy, f"/grants/{g['id']}/approve", CAROL)
    await receiver.wait(2, "/slack")

    status, ext = await post(
        proxy, f"/grants/{g['id']}/extend", ALICE, duration="30m", comment="need more time"
    )
    assert status == 202
    slack = (await receiver.wait(3, "/slack"))[2]
    plain = (await receiver.wait(3, "/json"))[2]
    link = f"https://jitgate.example.com/_jit/api/grants/{ext['id']}"
    assert slack["text"] == (
        f"alice requested an extension of {g['id']} by +30m on project:1; needs 2 approvals. "
        f"Reason: need more time; ticket INC-42; 30m more. Grant <{link}|{ext['id']}>"
    )
    assert slack["blocks"][0]["text"]["text"].startswith(":inbox_tray: alice requested an ext")
    fields = {
        f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in slack["blocks"][1]["fields"]
    }
    assert (fields["*Extends*"], fields["*Extra time*"], fields["*State*"]) == (
        f"`{g['id']}`", "+30m", "pending",
    )  # fmt: skip
    assert fields["*Decide by*"].endswith(" UTC") and "*Duration*" not in fields
    assert (plain["event"], plain["grant"]) == ("requested", ext)
    assert (plain["grant"]["kind"], plain["grant"]["extends"]) == ("extension", g["id"])

    await post(proxy, f"/grants/{ext['id']}/approve", BOB)  # one of two: no message yet
    status, done = await post(proxy, f"/grants/{ext['id']}/approve", CAROL)
    assert status == 200 and done["state"] == "applied"
    slack = (await receiver.wait(4, "/slack"))[3]
    plain = (await receiver.wait(4, "/json"))[3]
    assert slack["text"].startswith(
        f"alice's extension of {g['id']} by +30m on project:1 was approved by bob,carol. "
    )
    fields = {
        f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in slack["blocks"][1]["fields"]
    }
    assert fields["*Approved by*"] == "bob,carol" and fields["*Now expires*"].endswith(" UTC")
    assert (plain["event"], plain["grant"]) == ("approved", done)
    await asyncio.sleep(0.1)  # intended: no message more arrives
    assert len(receiver.calls) == 8


def test_slack_messages_for_a_denied_or_withdrawn_extension() -> None:
    now = time.time()
    ext = Grant(
        "g-2", "alice", "project:1", now, 0.0, "more", "", state="denied", duration=1800,
        needed=1, kind="extension", extends="g-1", ended_by="bob", end_comment="wrap up",
    )  # fmt: skip
    msg = slack_message("denied", ext, link=None, now=now)
    assert msg["text"].startswith(
        "alice's request for an extension of g-1 by +30m on project:1 was denied by bob. "
    )
    assert "*Comment*\nwrap up" in [f["text"] for f in msg["blocks"][1]["fields"]]
    withdrawn = slack_message("denied", replace(ext, ended_by="alice"), link=None, now=now)
    assert withdrawn["text"].startswith(
        "alice withdrew the request for an extension of g-1 by +30m on project:1. "
    )
