"""Webhook notifications about the access workflow, sent off the request path.

`Notifier.notify` renders one message per subscribed webhook and queues it at once. Each
webhook has its own queue and background task, so messages reach a receiver in order and
a slow or dead receiver delays no other; all POST through one shared client session and
retry with exponential backoff. A periodic task warns before grants expire, once per grant
across all replicas. A message that is not delivered is counted and logged, never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .grants import Grant
from .grantstore import RedisGrants
from .metrics import Metrics
from .policy import format_duration
from .settings import NotificationSettings, WebhookSettings

log = logging.getLogger("jitgate.notify")

_MAX_BACKOFF = 60.0
# An expiry notice mark outlives the grant by this much, so replicas whose clocks differ a
# little cannot announce the same expiry twice.
_MARK_MARGIN = 60.0


@dataclass(frozen=True)
class _Delivery:
    hook: WebhookSettings
    event: str
    grant_id: str
    body: bytes
    id: str


class _Lane:
    """One webhook's queue, delivered in order by one task."""

    def __init__(self, hook: WebhookSettings, queue_max: int) -> None:
        self.hook = hook
        self.queue: asyncio.Queue[_Delivery] = asyncio.Queue(queue_max)
        self.current: _Delivery | None = None
        self.task: asyncio.Task[None] | None = None


class Notifier:
    """Queue workflow events for webhooks and deliver them in the background."""

    def __init__(
        self,
        settings: NotificationSettings,
        *,
        prefix: str = "/_jit",
        grants: RedisGrants | None = None,
        policy_version: Callable[[], str] = lambda: "",
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.prefix = prefix
        self._grants = grants
        self._policy_version = policy_version
        self._metrics = metrics or Metrics()
        self._lanes = [_Lane(hook, settings.queue_max) for hook in settings.webhooks]
        self._session: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False

    def backlog(self) -> int:
        return sum(lane.queue.qsize() + (lane.current is not None) for lane in self._lanes)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": "jitgate"})
        self._metrics.notifications_backlog.set_function(self.backlog)
        for n, lane in enumerate(self._lanes):
            lane.task = asyncio.create_task(self._run(lane), name=f"notify-webhook-{n}")
        wanted = any("expiring" in hook.events for hook in self.settings.webhooks)
        if wanted and self._grants is not None:
            self._watcher = asyncio.create_task(self._watch_expiring(), name="notify-expiring")

    def notify(self, event: str, grant: Grant) -> None:
        """Queue the event for every webhook that wants it; never blocks, never raises."""
        lanes = [lane for lane in self._lanes if event in lane.hook.events]
        if not lanes:
            return
        now = time.time()
        bodies: dict[str, bytes] = {}
        for lane in lanes:
            hook = lane.hook
            try:
                body = bodies.get(hook.format)
                if body is None:
                    body = json.dumps(self.render(event, grant, hook.format, now)).encode()
                    bodies[hook.format] = body
            except Exception:  # a broken message must not fail the workflow step behind it
                self._metrics.notifications_dropped.labels(event).inc()
                log.exception(
                    "%s notification for grant %s not sent: rendering failed", event, grant.id
                )
                continue
            delivery = _Delivery(hook, event, grant.id, body, secrets.token_hex(8))
            if self._closing:
                self._dropped(event, grant.id, hook, "arrived during shutdown")
                continue
            try:
                lane.queue.put_nowait(delivery)
            except asyncio.QueueFull:
                self._dropped(event, grant.id, hook, f"queue full ({self.settings.queue_max})")

    def render(self, event: str, grant: Grant, fmt: str, now: float) -> dict[str, Any]:
        """Return the message body for one webhook format."""
        version = self._policy_version()
        if fmt == "slack":
            return slack_message(event, grant, link=self.link(grant), now=now, version=version)
        return {
            "event": event,
            "grant": grant.to_dict(),
            "time": _iso(now),
            "policy_version": version,
        }

    def link(self, grant: Grant) -> str | None:
        base = self.settings.public_url
        return f"{base}{self.prefix}/api/grants/{grant.id}" if base else None

    async def check_expiring(self, now: float | None = None) -> int:
        """Announce grants ending within the window that no replica announced; return how many."""
        if self._grants is None:
            return 0
        now = time.time() if now is None else now
        soon = await self._grants.expiring_between(now, now + self.settings.expiring_before)
        marks = [(g.id, g.expires_at - now + _MARK_MARGIN) for g in soon]
        won = await self._grants.claim_notices("expiring", marks)
        for grant, mine in zip(soon, won, strict=True):
            if mine:
                self.notify("expiring", grant)
        return sum(won)

    async def close(self, grace: float = 3.0) -> None:
        """Stop, delivering what is queued within grace seconds; count what is left."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(lane.queue.join() for lane in self._lanes)), grace
            )
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()  # a delivery under way counts and logs itself as not sent
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
            while not lane.queue.empty():
                d = lane.queue.get_nowait()
                self._dropped(d.event, d.grant_id, d.hook, "still queued at shutdown")
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, lane: _Lane) -> None:
        while True:
            lane.current = await lane.queue.get()
            try:
                await self._deliver(lane.current)
            finally:
                lane.current = None
                lane.queue.task_done()

    async def _deliver(self, d: _Delivery) -> None:
        problem = ""
        attempts = self.settings.retries + 1
        try:
            for attempt in range(attempts):
                if attempt:
                    pause = self.settings.backoff * 2 ** (attempt - 1)
                    await asyncio.sleep(min(_MAX_BACKOFF, pause))
                problem = await self._post(d)
                if not problem:
                    self._metrics.notifications_sent.labels(d.event).inc()
                    return
                log.info(
                    "notification %s (%s, grant %s) to %s: attempt %d of %d failed: %s",
                    d.id, d.event, d.grant_id, d.hook.origin, attempt + 1, attempts, problem,
                )  # fmt: skip
        except asyncio.CancelledError:
            self._dropped(d.event, d.grant_id, d.hook, "still being delivered at shutdown")
            raise
        self._metrics.notifications_failed.labels(d.event).inc()
        log.error(
            "notification %s (%s, grant %s) to %s failed after %d attempts: %s",
            d.id, d.event, d.grant_id, d.hook.origin, attempts, problem,
        )  # fmt: skip

    async def _post(self, d: _Delivery) -> str:
        """POST once; return "" on a 2xx answer, else what went wrong."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            "X-Jitgate-Event": d.event,
            "X-Jitgate-Delivery": d.id,  # the same on every retry, so receivers can dedupe
        }
        try:
            async with self._session.post(
                d.hook.url.reveal(),
                data=d.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=d.hook.timeout),
                allow_redirects=False,
            ) as resp:
                return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {d.hook.timeout:g}s"
        except Exception as exc:  # whatever stops a delivery is one failed attempt
            # Only the class: some aiohttp messages include the URL, and a webhook's is secret.
            return type(exc).__name__

    async def _watch_expiring(self) -> None:
        while True:
            try:
                await self.check_expiring()
            except Exception as exc:  # Redis unreachable: try again next round
                self._metrics.redis_errors.labels("notify_expiring").inc()
                log.warning("looking for grants about to expire failed: %r", exc)
            await asyncio.sleep(self.settings.check_interval)

    def _dropped(self, event: str, grant_id: str, hook: WebhookSettings, why: str) -> None:
        self._metrics.notifications_dropped.labels(event).inc()
        log.error(
            "%s notification for grant %s to %s not sent: %s", event, grant_id, hook.origin, why
        )


# --- Slack-compatible messages --------------------------------------------------------------


def slack_message(
    event: str, grant: Grant, *, link: str | None, now: float, version: str = ""
) -> dict[str, Any]:
    """Return a Slack incoming-webhook message: a plain summary and Block Kit blocks."""
    user, scope = _esc(grant.user), _esc(grant.scope)
    headline, summary = _headline(event, grant, user, scope, now)
    extension = grant.kind == "extension"
    fields = [("User", user), ("Scope", f"`{scope}`"), ("Reason", _esc(grant.reason) or "-")]
    if extension:
        fields.append(("Extends", f"`{_esc(grant.extends)}`"))
    if grant.ticket:
        fields.append(("Ticket", _esc(grant.ticket)))
    if extension:
        fields.append(("Extra time", f"+{format_duration(grant.duration)}"))
    else:
        fields.append(("Duration", format_duration(grant.duration) if grant.duration else "-"))
    fields.append(("State", grant.state + (" (break-glass)" if grant.break_glass else "")))
    if grant.entitlement:
        fields.append(("Entitlement", _esc(grant.entitlement)))
    if event == "requested" and grant.state == "pending":
        fields.append(("Decide by", _clock(grant.pending_until)))
    elif event == "approved":
        fields.append(("Approved by", _esc(grant.granted_by)))
        if extension:
            fields.append(("Now expires", _clock(grant.expires_at)))
    elif event == "denied":
        fields.append(("Denied by", _esc(grant.ended_by)))
        if grant.end_comment:
            fields.append(("Comment", _esc(grant.end_comment)))
    elif event in ("expiring", "break_glass"):
        fields.append(("Expires", _clock(grant.expires_at)))
    if event == "break_glass" and link:
        fields.append(("Review", f"`POST {link}/review`"))
    ref = f"<{link}|{grant.id}>" if link else f"`{grant.id}`"
    details = f"Reason: {_esc(grant.reason) or '-'}"
    if grant.ticket:
        details += f"; ticket {_esc(grant.ticket)}"
    if extension:
        details += f"; {format_duration(grant.duration)} more"
    elif grant.duration:
        details += f"; for {format_duration(grant.duration)}"
    context = f"jitgate · grant {ref}" + (f" · policy {version}" if version else "")
    return {
        "text": f"{summary}. {details}. Grant {ref}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
            {
                "type": "section",
                "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{_cut(v)}"} for k, v in fields],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


def _headline(event: str, grant: Grant, user: str, scope: str, now: float) -> tuple[str, str]:
    """Return the message's first line with emoji and emphasis, and the same in plain words."""
    if grant.kind == "extension" and event in ("requested", "approved", "denied"):
        return _extension_headline(event, grant, user, scope)
    if event == "requested":
        if grant.state == "pending":
            n = grant.needed
            said = f"{user} requested access to {scope}; needs {n} approval{'s' * (n != 1)}"
        else:
            said = f"{user} requested access to {scope}; active at once"
        return f":inbox_tray: {said}", said
    if event == "approved":
        said = f"{user}'s access to {scope} was approved by {_esc(grant.granted_by)}"
        return f":white_check_mark: {said}", said
    if event == "denied":
        if grant.ended_by == grant.user:
            said = f"{user} withdrew the request for {scope}"
        else:
            said = f"{user}'s request for {scope} was denied by {_esc(grant.ended_by)}"
        return f":no_entry_sign: {said}", said
    if event == "break_glass":
        said = (
            f"BREAK-GLASS: {user} took emergency access to {scope}; "
            "a follow-up review by another person is required"
        )
        return f":rotating_light: *{said}*", said
    left = format_duration(max(0, round(grant.expires_at - now)))
    said = f"{user}'s access to {scope} expires in {left}"
    return f":hourglass_flowing_sand: {said}", said


def _extension_headline(event: str, grant: Grant, user: str, scope: str) -> tuple[str, str]:
    what = f"{_esc(grant.extends)} by +{format_duration(grant.duration)} on {scope}"
    if event == "requested":
        n = grant.needed
        said = f"{user} requested an extension of {what}; needs {n} approval{'s' * (n != 1)}"
        return f":inbox_tray: {said}", said
    if event == "approved":
        said = f"{user}'s extension of {what} was approved by {_esc(grant.granted_by)}"
        return f":white_check_mark: {said}", said
    if grant.ended_by == grant.user:
        said = f"{user} withdrew the request for an extension of {what}"
    else:
        said = f"{user}'s request for an extension of {what} was denied by {_esc(grant.ended_by)}"
    return f":no_entry_sign: {said}", said


def _esc(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>); user text must not make them.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, most: int = 1900) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"  # Slack's field limit is 2000


def _clock(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
