"""Every Prometheus metric jitgate exposes, on its own registry.

Label values are route ids and fixed words, never raw paths, and label
children are bound once and cached, so the request path does no lookups
in prometheus-client's label dictionaries.

Under `jitgate serve --workers N` every process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, chosen by that
variable when prometheus-client is first imported) and a scrape, whichever worker
answers it, reads all of them: counters and histograms are summed, each gauge is
combined as its `multiprocess_mode` says. Values a process holds in memory (the grant
view's counts, queue lengths) are copied into its files by `Metrics.refresh`, which
each worker runs every second and before it renders a scrape.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client import multiprocess as mp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether values go to the multiprocess files (PROMETHEUS_MULTIPROC_DIR was set)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def clean_multiprocess_dir(path: Path) -> None:
    """Empty the multiprocess directory: files of an earlier run would be counted again."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)


def process_dead(pid: int, path: Path) -> None:
    """Drop a dead process's live gauges; its counters stay, so totals never go back."""
    mp.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


class _PolledGauge(Gauge):
    """A gauge read from a function: at scrape time in one process; with several, sampled
    into this process's file by `Metrics.refresh` (a scrape reads files, not memory)."""

    _poll: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        self._poll = f
        if not multiprocess():
            super().set_function(f)

    def sample(self) -> None:
        if self._poll is not None:
            self.set(self._poll())


class _VersionGauge(Gauge):
    """The loaded policy version's timestamp. Files keep every series a process wrote, so
    with several processes a replaced version is set to 0 rather than removed."""

    def remove(self, *labelvalues: Any) -> None:
        if multiprocess():
            self.labels(*labelvalues).set(0)
        else:
            super().remove(*labelvalues)


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
        self.lists = Counter(
            "jitgate_list_responses", "List responses by what was done (lists.py).",
            ["route", "outcome"], registry=r,
        )  # fmt: skip
        self.refs = Counter(
            "jitgate_ref_responses", "Responses whose references were checked (refs.py).",
            ["route", "outcome"], registry=r,
        )  # fmt: skip
        self.blob_rewrites = Counter(
            "jitgate_blob_rewrites", "Responses with blob fields, by what was done (blobs.py).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.blob_fetches = Counter(
            "jitgate_blob_fetches", "Blob URL fetches by outcome (blobfetch.py).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "jitgate_upstream_errors", "Upstream failures by kind.", ["kind"], registry=r
        )
        self.redis_errors = Counter(
            "jitgate_redis_errors", "Redis operations that failed.", ["op"], registry=r
        )
        self.redis_breaker_open = Gauge(
            "jitgate_redis_breaker_open",
            "1 while grant checks are refused (503) without asking Redis, until it answers.",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.redis_breaker_trips = Counter(
            "jitgate_redis_breaker_trips", "Times Redis trouble opened the breaker.", registry=r
        )
        self.active_grants = Gauge(
            "jitgate_active_grants", "Grants active now, as last counted.", registry=r,
            multiprocess_mode="livemostrecent",
        )  # fmt: skip
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
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.audit_spooled = Gauge(
            "jitgate_audit_spooled",
            "Audit records waiting for a sink only in the spool (not in memory), by sink.",
            ["sink"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.audit_spool_bytes = Gauge(
            "jitgate_audit_spool_bytes", "Size of the audit spools (summed over workers).",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.audit_writable = Gauge(
            "jitgate_audit_writable",
            "1 while audit records can be kept (spool writable), 0 when not: strict mode refuses.",
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.policy_reloads = Counter(
            "jitgate_policy_reloads", "Policy reloads by result (ok, error or unchanged).",
            ["result"], registry=r,
        )  # fmt: skip
        self.policy_info = _VersionGauge(
            "jitgate_policy_loaded_timestamp_seconds",
            "When the running policy was loaded, by policy version.", ["version"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.live_connections = Gauge(
            "jitgate_live_connections", "Open streams and WebSockets that depend on a grant.",
            registry=r, multiprocess_mode="livesum",
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
        self.notifications_backlog = _PolledGauge(
            "jitgate_notifications_backlog", "Webhook notifications queued or being delivered.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.grant_events = Counter(
            "jitgate_grant_events", "Grant lifecycle events written, by event.", ["event"],
            registry=r,
        )  # fmt: skip
        self.metadata_lookups = Counter(
            "jitgate_metadata_lookups", "Recording metadata lookups by where the answer came "
            "from: memory, redis, upstream, or error.", ["source"], registry=r,
        )  # fmt: skip
        self.sensitivity_refusals = Counter(
            "jitgate_sensitivity_refusals", "Requests under a grant refused by a sensitivity "
            "rule (blocked) or for want of the recording's metadata (unknown).", ["outcome"],
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
        self._view: _ViewSampler | None = None

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
        if multiprocess():
            self._view = _ViewSampler(read)
        else:
            self.registry.register(_GrantViewCollector(read))

    def refresh(self) -> None:
        """Copy what this process holds in memory into its multiprocess files."""
        if not multiprocess():
            return
        self.notifications_backlog.sample()
        if self._view is not None:
            self._view.sample()

    def render(self) -> bytes:
        if not multiprocess():
            return bytes(generate_latest(self.registry))
        self.refresh()
        every = CollectorRegistry()
        mp.MultiProcessCollector(every)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(every))


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


class _ViewSampler:
    """The grant view's counts as multiprocess metrics: the same names as the collector's,
    counters summed over workers, `current` the lowest of the live workers'."""

    def __init__(self, read: Callable[[], tuple[int, int, bool, int]]) -> None:
        self.read = read
        checks = Counter(
            "jitgate_grant_checks",
            "Grant checks by where they were answered: the local view (memory) or Redis.",
            ["answer"], registry=None,
        )  # fmt: skip
        self.hits, self.misses = checks.labels("view"), checks.labels("redis")
        self.seen = (0, 0)
        self.current = Gauge(
            "jitgate_grant_view_current",
            "1 while the grant view may answer (its event feed is current), else 0.",
            registry=None, multiprocess_mode="livemin",
        )  # fmt: skip
        self.entries = Gauge(
            "jitgate_grant_view_entries", "Found grant checks the view remembers.",
            registry=None, multiprocess_mode="livesum",
        )  # fmt: skip

    def sample(self) -> None:
        hits, misses, current, size = self.read()
        self.hits.inc(hits - self.seen[0])
        self.misses.inc(misses - self.seen[1])
        self.seen = (hits, misses)
        self.current.set(int(current))
        self.entries.set(size)


class SupervisorMetrics:
    """What the supervisor of `serve --workers N` counts, in the workers' multiprocess files."""

    def __init__(self) -> None:
        r = CollectorRegistry()
        self.restarts = Counter(
            "jitgate_worker_restarts", "Workers restarted after they died unexpectedly.",
            registry=r,
        )  # fmt: skip
        self.workers = Gauge(
            "jitgate_workers", "Worker processes serving now.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
