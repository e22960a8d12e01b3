"""`jitgate grants …`: as yourself through the API (with a token), or as an operator on Redis.

`add`, `revoke`, `list` and `show` without a token act on Redis directly, and write the
same audit records the API would.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from ..settings import Settings
from .common import EXIT_FINDING, EXIT_OK, EXIT_USAGE, UsageError, api_url, duration, redis_for


async def run(args: argparse.Namespace, settings: Settings) -> int:
    token = getattr(args, "token", None) or os.environ.get("JITGATE_TOKEN")
    if token and args.verb != "add":  # add is an admin action straight on Redis
        return await _grants_api(args, settings, token)
    if args.verb not in ("add", "revoke", "list", "show"):
        raise UsageError(f"grants {args.verb} acts as you: pass --token or set JITGATE_TOKEN")
    if args.verb == "list" and (args.pending or args.all or args.unreviewed):
        raise UsageError("--pending, --all and --unreviewed need a token (they use the API)")
    return await _grants(args, settings)


def _actor(by: str | None) -> str:
    return by or f"{getpass.getuser()}@{socket.gethostname()} (cli)"


async def _grants(args: argparse.Namespace, settings: Settings) -> int:
    from .. import policyfile
    from ..app import make_audit_log
    from ..grantstore import RedisGrants
    from ..metrics import Metrics
    from ..workflow import grant_record

    compiled = policyfile.load(settings.policy_file)  # every audit record names its version
    redis = redis_for(settings)
    wait = (settings.redis.wait_replicas, settings.redis.wait_timeout)
    store = RedisGrants(redis, settings.redis.key_prefix, wait=wait)
    audit_log = make_audit_log(settings, redis, Metrics())
    await audit_log.start()  # through the spool: a record survives Redis failing right after
    try:
        if args.verb == "add":
            ttl = duration(args.ttl)
            if ttl > settings.grant_max_ttl:
                raise UsageError(
                    f"--ttl {args.ttl} exceeds grant_max_ttl ({settings.grant_max_ttl:.0f}s)"
                )
            if not args.reason.strip():
                raise UsageError("--reason must not be empty")
            grant = await store.add(args.user, args.scope, ttl, args.reason, _actor(args.by))
            audit_log.emit(
                grant_record(
                    "grant.activated",
                    grant,
                    actor=grant.granted_by,
                    policy_version=compiled.version,
                    recording=compiled.recording_of(grant.scope),
                )
            )
            print(json.dumps(grant.to_dict()) if args.json else grant.id)
            return EXIT_OK
        if args.verb == "revoke":
            revoked = await store.revoke(
                args.grant_id, by=_actor(args.by), comment=args.comment or ""
            )
            if revoked is None:
                print(f"no active grant {args.grant_id}", file=sys.stderr)
                return EXIT_FINDING
            audit_log.emit(
                grant_record(
                    "grant.revoked",
                    revoked,
                    actor=_actor(args.by),
                    comment=args.comment,
                    policy_version=compiled.version,
                    recording=compiled.recording_of(revoked.scope),
                )
            )
            print(json.dumps(revoked.to_dict()) if args.json else f"revoked {revoked.id}")
            return EXIT_OK
        if args.verb == "show":
            found = await store.get(args.grant_id)
            if found is None:
                print(f"no grant {args.grant_id}", file=sys.stderr)
                return EXIT_FINDING
            _show(found.to_dict(), args.json)
            return EXIT_OK
        grants = await store.list(args.user)
        _listing([g.to_dict() for g in grants], args.json)
        return EXIT_OK
    finally:
        await audit_log.close()
        await redis.aclose()


async def _grants_api(args: argparse.Namespace, settings: Settings, token: str) -> int:
    import aiohttp

    from .client import ApiClient, ApiError

    base = (args.url.rstrip("/") + settings.prefix) if args.url else api_url(settings)
    verb, comment = args.verb, {"comment": getattr(args, "comment", None) or ""}
    async with ApiClient(base, token) as api:
        try:
            if verb == "request":
                body: dict[str, Any] = {"scope": args.scope, "reason": args.reason}
                if args.ticket:
                    body["ticket"] = args.ticket
                if args.duration:
                    body["duration"] = args.duration
                if args.break_glass:
                    body["break_glass"] = True
                result = await api.call("POST", "/requests", body)
            elif verb == "extend":
                body = {**comment, "duration": args.duration}
                result = await api.call("POST", f"/grants/{args.grant_id}/extend", body)
            elif verb in ("approve", "deny", "relinquish", "revoke", "review"):
                result = await api.call("POST", f"/grants/{args.grant_id}/{verb}", comment)
            elif verb == "show":
                result = await api.call("GET", f"/grants/{args.grant_id}")
            else:
                path = "/grants/pending" if args.pending else "/grants/mine"
                if args.unreviewed:
                    path = "/grants/unreviewed"
                if args.all:
                    query = {k: v for k, v in (("user", args.user), ("state", args.state)) if v}
                    path = "/grants" + (f"?{urlencode(query)}" if query else "")
                grants = (await api.call("GET", path))["grants"]
                if args.user and not args.all:
                    grants = [g for g in grants if g["user"] == args.user]
                _listing(grants, args.json)
                return EXIT_OK
        except ApiError as exc:
            print(f"jitgate: {exc}", file=sys.stderr)
            return EXIT_USAGE if exc.status in (400, 401) else EXIT_FINDING
        except aiohttp.ClientError as exc:
            raise UsageError(f"cannot reach jitgate at {base}: {exc}") from None
    if verb == "show" or args.json:
        _show(result, args.json)
    elif result.get("kind") == "extension":
        print(f"{result['id']}  {result['state']}  (extension of {result['extends']})")
    else:
        print(f"{result['id']}  {result['state']}")
    return EXIT_OK


def _show(grant: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(grant, indent=2))
        return
    for key, value in grant.items():
        if value in (None, "", [], 0, False) and key not in ("state",):
            continue
        if key == "kind" and value == "grant":
            continue
        if key.endswith("_at") or key == "pending_until":
            value = _when(value)
        elif key == "approvals":
            value = ", ".join(f"{a['by']} ({_when(a['at'])})" for a in value)
        print(f"{key:<14} {value}")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _listing(grants: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(grants, indent=2))
    else:
        _table(grants)


def _table(grants: list[dict[str, Any]]) -> None:
    now = time.time()
    rows = [("ID", "USER", "SCOPE", "STATE", "EXPIRES (UTC)", "LEFT", "GRANTED BY", "REASON")]
    for g in grants:
        expires = g.get("expires_at") or 0
        left = int(max(0, expires - now)) if g.get("state") == "active" else 0
        rows.append(
            (
                g["id"],
                g["user"],
                g["scope"],
                g.get("state", ""),
                datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M:%S")
                if expires
                else "-",
                f"{left // 3600}h{left % 3600 // 60:02d}m{left % 60:02d}s" if left else "-",
                g.get("granted_by") or "-",
                g.get("reason", ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if len(rows) == 1:
        print("(no grants)")
