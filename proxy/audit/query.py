"""Audit queries as people ask them: one set of filters for `jitgate audit query` and the API.

`Query` says which records to read and `Page` holds one page of them (store.py answers).
`parse` turns filters given as text (command-line options or URL query parameters, the same
names in both) into a Query; `render` prints records as a table, JSON lines or
CSV; `summary_text` prints a grant summary for people.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..settings.read import parse_duration
from .pairs import fold

FILTERS = ("user", "scope", "recording", "grant", "subject", "event", "since", "until")
FORMATS = ("table", "json", "jsonl", "csv")
CSV_FIELDS = (
    "time", "event", "user", "actor", "scope", "recording", "grant_id", "decision", "method",
    "path", "status", "bytes", "duration_ms", "client_ip", "user_agent", "reason", "ticket",
    "comment", "why", "subject", "id",
)  # fmt: skip
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class Query:
    """Which records to read: every given filter must hold."""

    user: str | None = None
    scope: str | None = None
    recording: str | None = None
    grant: str | None = None
    events: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    limit: int = 1000
    cursor: str | None = None
    order: str = "asc"
    subject: str | None = None  # as records carry it (audit/subjects.py turns an id into it)

    def __post_init__(self) -> None:
        if self.order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, not {self.order!r}")
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, not {self.limit}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and math.isnan(value):
                raise ValueError(f"{name} must be a number of seconds, not NaN")


@dataclass(frozen=True)
class Page:
    """Records in the query's order, and the cursor that continues after them (None: done)."""

    records: list[dict[str, Any]]
    next: str | None


class QueryError(ValueError):
    """A filter that cannot be understood; the message says which and why."""


def parse_time(text: str, now: float | None = None) -> float:
    """Read '2026-10-01', '2026-10-01T12:00:00Z', unix seconds, or a duration ago ('30d')."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise QueryError(f"time must be finite, got {text!r}")
        return seconds
    if re.fullmatch(r"(\d+(\.\d+)?[smhdw])+", value.lower()):
        return (time.time() if now is None else now) - parse_duration(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"cannot read time {text!r}: use 2026-10-01, 2026-10-01T12:00:00Z, "
            "unix seconds, or a duration ago such as 30d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # audit times are UTC; so is a bare date
    return when.timestamp()


def parse(
    get: Callable[[str], str | None],
    get_all: Callable[[str], Sequence[str]],
    *,
    now: float | None = None,
) -> Query:
    """Build a Query from text filters; raise QueryError naming the first bad one."""
    since = get("since")
    until = get("until")
    limit_text = get("limit") or "1000"
    try:
        limit = int(limit_text)
    except ValueError:
        raise QueryError(f"limit must be a whole number, got {limit_text!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    order = get("order") or "asc"
    if order not in ("asc", "desc"):
        raise QueryError(f"order must be asc or desc, got {order!r}")
    events = tuple(e for raw in get_all("event") for e in raw.split(",") if e.strip())
    q = Query(
        user=get("user") or None,
        scope=get("scope") or None,
        recording=get("recording") or None,
        grant=get("grant") or None,
        subject=get("subject") or None,
        events=tuple(e.strip() for e in events),
        since=parse_time(since, now) if since else None,
        until=parse_time(until, now) if until else None,
        limit=limit,
        cursor=get("cursor") or None,
        order=order,
    )
    if q.since is not None and q.until is not None and q.until <= q.since:
        raise QueryError("until must be later than since")
    return q


def from_mapping(params: Mapping[str, Any], *, now: float | None = None) -> Query:
    """Build a Query from a plain mapping (argparse namespace vars); lists allowed for event."""

    def get(name: str) -> str | None:
        value = params.get(name)
        return None if value is None else str(value)

    def get_all(name: str) -> list[str]:
        value = params.get(name)
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]

    return parse(get, get_all, now=now)


def to_params(q: Query) -> list[tuple[str, str]]:
    """Return a Query as the URL parameters `parse` reads back (times as unix seconds)."""
    out = [
        (name, str(value))
        for name, value in (
            ("user", q.user), ("scope", q.scope), ("recording", q.recording),
            ("grant", q.grant), ("subject", q.subject), ("since", q.since), ("until", q.until),
            ("limit", q.limit), ("order", q.order), ("cursor", q.cursor),
        )
        if value is not None
    ]  # fmt: skip
    out.extend(("event", e) for e in q.events)
    return out


def annotate(records: list[dict[str, Any]], why: Mapping[str, Mapping[str, Any]]) -> None:
    """Add `why` (the grant's reason and ticket) to each record made under a known grant."""
    for rec in records:
        info = why.get(rec.get("grant_id") or "")
        if info and not rec.get("event", "").startswith("grant."):
            parts = [str(info.get("reason") or "")]
            if info.get("ticket"):
                parts.append(f"[{info['ticket']}]")
            rec["why"] = " ".join(p for p in parts if p)


def render(records: list[dict[str, Any]], fmt: str, next_cursor: str | None = None) -> str:
    """Return records as table, json (with the cursor), jsonl or csv text."""
    if fmt == "json":
        return json.dumps({"records": records, "next": next_cursor}, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: _cell(rec.get(k)) for k in CSV_FIELDS})
        return out.getvalue()
    return _table(fold(records), next_cursor)


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value  # a spreadsheet must not run a cell as a formula
    return value


def _table(records: list[dict[str, Any]], next_cursor: str | None) -> str:
    head = ("TIME", "EVENT", "USER", "SCOPE", "GRANT", "STATUS", "PATH / ACTOR", "WHY")
    rows = [head]
    for rec in records:
        what = rec.get("path") or (f"by {rec['actor']}" if rec.get("actor") else "")
        why = rec.get("why") or rec.get("reason") or "; ".join(rec.get("reasons") or [])
        rows.append(
            (
                str(rec.get("time", ""))[:23].replace("T", " "),
                str(rec.get("event", "")),
                str(rec.get("user", "")),
                str(rec.get("scope", "")),
                str(rec.get("grant_id", "")),
                str(rec.get("status", "")),
                _clip(str(what), 48),
                _clip(str(why), 60),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"{len(rows) - 1} record(s)"
        + (f"; more with --cursor {next_cursor}" if next_cursor else "")
    )
    return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # no newlines or tabs from a record can break the table
    return text if len(text) <= width else text[: width - 1] + "…"


def summary_text(s: Mapping[str, Any]) -> str:
    """Return a grant summary for people: who, why, what was fetched, when."""
    lines = [
        f"grant     {s['grant_id']}  ({s.get('state') or 'unknown state'})",
        f"user      {s.get('user')}",
        f"scope     {s.get('scope')}" + ("  BREAK-GLASS" if s.get("break_glass") else ""),
        f"reason    {s.get('reason') or '-'}"
        + (f"  ticket {s['ticket']}" if s.get("ticket") else ""),
        f"approvers {', '.join(s.get('approvers') or []) or '-'}",
        f"requests  {s['requests']['allowed']} allowed, {s['requests']['denied']} denied; "
        f"{s['bytes']} bytes",
        f"access    first {s.get('first_access') or '-'}, last {s.get('last_access') or '-'}",
    ]
    if s.get("recordings"):
        lines.append(f"viewed    {', '.join(s['recordings'])}")
    lines.append("")
    lines.append("lifecycle")
    for step in s.get("events") or []:
        extra = " ".join(f"{k}={step[k]!r}" for k in ("actor", "comment") if step.get(k))
        when = str(step.get("time", ""))[:23].replace("T", " ")
        lines.append(f"  {when}  {step.get('event')}  {extra}".rstrip())
    resources = s.get("resources") or []
    lines.append("")
    lines.append(f"resources ({len(resources)})")
    for r in resources:
        statuses = ",".join(f"{k}x{v}" for k, v in sorted((r.get("statuses") or {}).items()))
        lines.append(
            f"  {r.get('method', '')} {r.get('path', '')}  {r.get('requests', 0)} req  "
            f"{r.get('bytes', 0)} B  [{statuses}]  {str(r.get('first', ''))[:19]}"
        )
    return "\n".join(lines) + "\n"
