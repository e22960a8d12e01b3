"""Decision and completion records: one forwarded request, two records.

A request the gate forwards is audited twice. Its `access.allow` record (the decision: who,
what, under which grant, why) is spooled before the request goes upstream, so no response
byte reaches the client without it; its `access.done` record follows when the response has
ended, with `decision_id` (the id of that `access.allow`), `status`, `bytes` and
`duration_ms`, and the fields the indexes use (user, scope, recording, grant_id) and the
resource (method, path). An `access.allow` without its `access.done` is a request that was
still being answered when the writer crashed (or is still streaming).

Refusals and forward-auth answers stay one record each: their status is known before
anything is sent. This module folds the pairs back together for people (the table of
`jitgate audit query` and the audit page) and into grant summaries.
"""

from __future__ import annotations

from typing import Any

ALLOW = "access.allow"
DENY = "access.deny"
DONE = "access.done"
ACCESS_EVENTS = (ALLOW, DENY, DONE)
# What a completion adds to its decision.
COMPLETION_FIELDS = ("status", "bytes", "duration_ms")

Record = dict[str, Any]


def fold(records: list[Record]) -> list[Record]:
    """Return the records with each `access.done` merged into its `access.allow`, where both
    are in the list (the others as they are)."""
    done = {
        str(r["decision_id"]): r for r in records if r.get("event") == DONE and "decision_id" in r
    }
    merged: set[str] = set()
    out = []
    for rec in records:
        event = rec.get("event")
        if event == ALLOW and "status" not in rec:
            end = done.get(str(rec.get("id")))
            if end is not None:
                merged.add(str(rec.get("id")))
                rec = {**rec, **{k: end[k] for k in COMPLETION_FIELDS if k in end}}
                extra = end.get("reasons")
                if extra:
                    rec["reasons"] = [*(rec.get("reasons") or []), *extra]
        elif event == DONE and str(rec.get("decision_id")) in merged:
            continue
        out.append(rec)
    # A completion seen before its decision (newest first): drop it once merged.
    return [r for r in out if not (r.get("event") == DONE and str(r.get("decision_id")) in merged)]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def note_access(
    out: dict[str, Any],
    resources: dict[tuple[str, str], dict[str, Any]],
    recordings: dict[str, None],
    rec: Record,
    fallback_time: str,
) -> None:
    """Fold one access record (decision, completion or refusal) into a grant summary."""
    event = rec.get("event")
    stamp = rec.get("time")
    when = stamp if isinstance(stamp, str) else fallback_time
    path, method = rec.get("path"), rec.get("method")
    key = (str(method) if method is not None else "", str(path) if path is not None else "")
    res = resources.get(key)
    if res is None:
        res = resources[key] = {
            "path": key[1], "method": key[0], "requests": 0, "denied": 0, "bytes": 0,
            "first": when, "last": when, "statuses": {},
        }  # fmt: skip
    if event != DONE:  # a request: its decision (or its refusal)
        res["requests"] += 1
        res["last"] = when
    if event == ALLOW:
        out["requests"]["allowed"] += 1
        out["first_access"] = out["first_access"] or when
        out["last_access"] = when
        if isinstance(rec.get("recording"), str):
            recordings.setdefault(rec["recording"])
    elif event == DENY:
        out["requests"]["denied"] += 1
        res["denied"] += 1
    # The status and bytes: on the completion, or on a record that is both (forward-auth,
    # refusals, and trails written before decisions and completions were split).
    if event == DONE or "status" in rec:
        size = _int(rec.get("bytes")) if event != DENY else 0
        out["bytes"] += size
        res["bytes"] += size
        status = str(rec.get("status"))
        res["statuses"][status] = res["statuses"].get(status, 0) + 1
