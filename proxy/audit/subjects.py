"""Audit by data subject: who viewed this person's recordings, when, under which grant, why.

Access records made under a grant carry `subject`, the person the recording is of, in the
form the config chooses (`SubjectForm`): a keyed HMAC of the id (`hmac:` and 32 hex
digits of HMAC-SHA256 over "jitgate subject", a NUL byte and the id; the default) or the
plain id. The store indexes records by it
(`{key}:idx:subject:{subject}`), so `report` reads one person's records without a scan of
the trail, and folds them into views (one per viewer, grant and recording) with the
reason each grant was given: the answer to a data subject access request (DSAR).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import time
from typing import Any

from ..settings import Settings
from .query import MAX_LIMIT, Query, _cell
from .store import AuditStore

HASHED = "hmac:"
_LABEL = b"jitgate subject\x00"
# A request served is an `access.allow` with its status, or (where the decision is written
# before the response and its completion after) the `access.done` that completes it.
_ACCESS = ("access.allow", "access.deny", "access.done")

# The export's columns, each with what it means (the header of a DSAR export).
COLUMNS = (
    ("viewer", "who viewed the recording (the identity jitgate verified)"),
    ("recording", "the recording viewed"),
    ("scope", "the scope the grant covered the recording by"),
    ("grant_id", "the time-limited grant the viewing was done under"),
    ("first_access", "first request under the grant for this recording (UTC)"),
    ("last_access", "last request under the grant for this recording (UTC)"),
    ("requests", "requests allowed (pages, events, snapshots of the recording)"),
    ("denied", "requests refused"),
    ("bytes", "bytes sent to the viewer"),
    ("reason", "the reason the viewer gave for the grant"),
    ("ticket", "the ticket the grant names, if any"),
    ("approvers", "who approved the grant (empty: approved by policy)"),
    ("break_glass", "whether the grant was an emergency (break-glass) grant"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SubjectForm:
    """How audit records carry a data subject: `hash` (a keyed HMAC) or `plain`."""

    mode: str
    key: bytes | None = None

    def __call__(self, subject: str) -> str:
        """Return the subject as records carry it."""
        if self.mode == "plain":
            return subject
        assert self.key is not None
        # A fixed label keeps these MACs apart from the chain's when both use audit.hmac_key.
        message = _LABEL + subject.encode()
        digest = hmac.new(self.key, message, hashlib.sha256).hexdigest()
        return HASHED + digest[:32]

    def stored(self, given: str) -> str:
        """Return what to look up for an id someone gives: a record's `hmac:` form as it is."""
        return given if self.mode == "hash" and given.startswith(HASHED) else self(given)


def form_for(settings: Settings) -> SubjectForm | None:
    """Return the configured subject form; None without a `metadata` section."""
    meta = settings.metadata
    if meta is None:
        return None
    key = meta.subject.key.reveal().encode() if meta.subject.key is not None else None
    return SubjectForm(meta.subject.audit, key)


def with_subject(q: Query, form: SubjectForm | None) -> Query:
    """Turn a query's subject filter (an id, or a record's hmac: form) into the stored form."""
    if q.subject is None or form is None:
        return q
    return dataclasses.replace(q, subject=form.stored(q.subject))


async def report(
    store: AuditStore,
    given: str,
    stored: str,
    *,
    since: float | None = None,
    until: float | None = None,
) -> dict[str, Any]:
    """Return who viewed the subject's recordings: one view per viewer, grant and recording."""
    views: dict[tuple[str, str, str], dict[str, Any]] = {}
    q = Query(subject=stored, events=_ACCESS, since=since, until=until, limit=MAX_LIMIT)
    count = 0
    while True:
        page = await store.query(q)
        for rec in page.records:
            count += 1
            _fold(views, rec)
        if page.next is None:
            break
        q = dataclasses.replace(q, cursor=page.next)
    why = await store.grant_reasons(v["grant_id"] for v in views.values() if v["grant_id"])
    for view in views.values():
        info = why.get(view["grant_id"] or "", {})
        for name in ("reason", "ticket", "break_glass"):
            view[name] = info.get(name, view[name])
        view["approvers"] = list(info.get("approvers") or [])
    return {
        "subject": given,
        "subject_key": stored,
        "generated_at": _iso(time.time()),
        "since": None if since is None else _iso(since),
        "until": None if until is None else _iso(until),
        "records": count,
        "columns": dict(COLUMNS),
        "views": sorted(views.values(), key=lambda v: (v["first_access"] or "", v["viewer"])),
    }


def _fold(views: dict[tuple[str, str, str], dict[str, Any]], rec: dict[str, Any]) -> None:
    viewer, grant = str(rec.get("user") or ""), str(rec.get("grant_id") or "")
    what = str(rec.get("recording") or rec.get("scope") or "")
    view = views.get((viewer, grant, what))
    if view is None:
        view = views[(viewer, grant, what)] = {
            "viewer": viewer, "recording": what, "scope": rec.get("scope"), "grant_id": grant,
            "first_access": None, "last_access": None, "requests": 0, "denied": 0, "bytes": 0,
            "reason": None, "ticket": None, "approvers": [], "break_glass": False,
        }  # fmt: skip
    when = rec.get("time") if isinstance(rec.get("time"), str) else None
    event = rec.get("event")
    if event in ("access.allow", "access.done"):
        view["first_access"] = view["first_access"] or when
        view["last_access"] = when or view["last_access"]
        if event == "access.allow" and "status" not in rec:
            return  # a decision written before its response: its access.done counts it
        view["requests"] += 1
        size = rec.get("bytes")
        view["bytes"] += size if isinstance(size, int) and not isinstance(size, bool) else 0
    else:
        view["denied"] += 1


def render(rep: dict[str, Any], fmt: str) -> str:
    """Return a report as json, csv (with a header explaining the columns) or a table."""
    if fmt == "json":
        return json.dumps(rep, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        out.write(f"# jitgate: who viewed recordings of data subject {_line(rep['subject'])}\n")
        out.write(f"# subject as audit records carry it: {rep['subject_key']}\n")
        span = f"from {rep['since'] or 'the start of the trail'} to {rep['until'] or 'now'}"
        out.write(f"# generated {rep['generated_at']}; {span}; {rep['records']} records\n")
        for name, meaning in COLUMNS:
            out.write(f"# {name}: {meaning}\n")
        names = [name for name, _ in COLUMNS]
        writer = csv.DictWriter(out, names, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for view in rep["views"]:
            row = {k: _cell(view.get(k)) for k in names}
            row["approvers"] = " ".join(view.get("approvers") or [])
            writer.writerow(row)
        return out.getvalue()
    head = ("VIEWER", "RECORDING", "GRANT", "FIRST", "LAST", "REQ", "WHY")
    rows = [head]
    for v in rep["views"]:
        why = " ".join(str(p) for p in (v.get("reason") or "", v.get("ticket") or "") if p)
        rows.append(
            (
                v["viewer"], v["recording"], v["grant_id"],
                str(v["first_access"] or "")[:19].replace("T", " "),
                str(v["last_access"] or "")[:19].replace("T", " "),
                str(v["requests"]), _line(why)[:60],
            )
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"{len(rep['views'])} view(s) in {rep['records']} record(s)")
    return "\n".join(lines) + "\n"


def _line(text: str) -> str:
    return " ".join(str(text).split())


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
