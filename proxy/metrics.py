"""Every Prometheus metric jitgate exposes, on its own registry.

Label values are route ids and fixed words, never raw paths, and label
children are bound once and cached, so the request path does no lookups
in prometheus-client's label dictionaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jitgate_requests", "Requests by route id and decision.", ["route", "decision"],
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "jitgate_request_duration_seconds", "Time from request to the end of the response.",
            ["route"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "jitgate_upstream_errors", "Upstream failures by kind.", ["kind"], registry=r
        )
        self.redis_errors = Counter(
            "jitgate_redis_errors", "Redis operations that failed.", ["op"], registry=r
        )
        self.active_grants = Gauge(
            "jitgate_active_grants", "Grants active now, as last counted.", registry=r
        )
        self.audit_delivered = Counter(
            "jitgate_audit_records_delivered", "Audit records a sink took.", ["sink"], registry=r
        )
        self.audit_failed = Counter(
            "jitgate_audit_write_failures", "Audit records whose write failed (kept for retry).",
            ["sink"], registry=r,
        )  # fmt: skip
        self.audit_dropped = Counter(
            "jitgate_audit_records_dropped", "Audit records that could not be kept.", ["sink"],
            registry=r,
        )  # fmt: skip
        self.audit_backlog = Gauge(
            "jitgate_audit_backlog", "Audit records not yet delivered, by sink.", ["sink"],
            registry=r,
        )  # fmt: skip
        self.audit_spooled = Gauge(
            "jitgate_audit_spooled",
            "Audit records waiting for a sink only in the spool (not in memory), by sink.",
            ["sink"], registry=r,
        )  # fmt: skip
        self.audit_spool_bytes = Gauge(
            "jitgate_audit_spool_bytes", "Size of this process's audit spool.", registry=r
        )
        self.audit_writable = Gauge(
            "jitgate_audit_writable",
            "1 while audit records can be kept (spool writable), 0 when not: strict mode refuses.",
            registry=r,
        )
        self.policy_reloads = Counter(
            "jitgate_policy_reloads", "Policy reloads by result (ok, error or unchanged).",
            ["result"], registry=r,
        )  # fmt: skip
        self.policy_info = Gauge(
            "jitgate_policy_loaded_timestamp_seconds",
            "When the running policy was loaded, by policy version.", ["version"], registry=r,
        )  # fmt: skip
        self.live_connections = Gauge(
            "jitgate_live_connections", "Open streams and WebSockets that depend on a grant.",
            registry=r,
        )  # fmt: skip
        self.live_cut = Counter(
            "jitgate_live_connections_cut", "Streams and WebSockets cut because their grant ended.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.notifications_sent = Counter(
            "jitgate_notifications_sent", "Webhook notifications delivered, by event.", ["event"],
            registry=r,
        )  # fmt: skip
        self.notifications_failed = Counter(
            "jitgate_notifications_failed", "Webhook notifications that failed every attempt.",
            ["event"], registry=r,
        )  # fmt: skip
        self.notifications_dropped = Counter(
            "jitgate_notifications_dropped",
            "Webhook notifications not sent: the queue was full, or still queued at shutdown.",
            ["event"], registry=r,
        )  # fmt: skip
        self.notifications_backlog = Gauge(
            "jitgate_notifications_backlog", "Webhook notifications queued or being delivered.",
            registry=r,
        )  # fmt: skip
        # Forward-auth ({prefix}/authz): decisions for a proxy in front, apart from proxy mode.
        self.authz_requests = Counter(
            "jitgate_authz_requests", "Forward-auth decisions by route id and decision.",
            ["route", "decision"], registry=r,
        )  # fmt: skip
        self.authz_duration = Histogram(
            "jitgate_authz_duration_seconds", "Time to answer a forward-auth request.",
            ["route"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self._bound: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._authz_bound: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def request(self, route: str, decision: str) -> tuple[Counter, Histogram]:
        """Return the bound (counter, histogram) children for one route and decision."""
        key = (route, decision)
        bound = self._bound.get(key)
        if bound is None:
            bound = (self.requests.labels(route, decision), self.duration.labels(route))
            self._bound[key] = bound
        return bound

    def authz(self, route: str, decision: str) -> tuple[Counter, Histogram]:
        """The same as `request`, for forward-auth decisions."""
        key = (route, decision)
        bound = self._authz_bound.get(key)
        if bound is None:
            bound = (self.authz_requests.labels(route, decision), self.authz_duration.labels(route))
            self._authz_bound[key] = bound
        return bound

    def watch_grant_view(self, read: Callable[[], tuple[int, int, bool, int]]) -> None:
        """Expose the grant view's counts, read at scrape time: (hits, misses, current, size)."""
        self.registry.register(_GrantViewCollector(read))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _GrantViewCollector(Collector):
    def __init__(self, read: Callable[[], tuple[int, int, bool, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits, misses, current, size = self.read()
        checks = CounterMetricFamily(
            "jitgate_grant_checks",
            "Grant checks by where they were answered: the local view (memory) or Redis.",
            labels=["answer"],
        )
        checks.add_metric(["view"], hits)
        checks.add_metric(["redis"], misses)
        yield checks
        yield GaugeMetricFamily(
            "jitgate_grant_view_current",
            "1 while the grant view may answer (its event feed is current), else 0.",
            value=int(current),
        )
        yield GaugeMetricFamily(
            "jitgate_grant_view_entries", "Found grant checks the view remembers.", value=size
        )
